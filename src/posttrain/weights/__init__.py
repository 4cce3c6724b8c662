"""Loading models (hub, local directories, run directories, GGUF) and exporting them to Hugging Face format."""

from posttrain.weights.export import export, export_command, save_pretrained
from posttrain.weights.hub import load, load_model, resolve

__all__ = ["load", "load_model", "resolve", "save_pretrained", "export", "export_command"]
