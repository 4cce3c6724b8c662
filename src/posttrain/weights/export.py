"""Native model (+ tokenizer) -> a Hugging Face directory that transformers loads as is.

The loading key map reversed: GPT-2's projections go back to Conv1D's (in, out); a tied lm_head
is left out of model.safetensors, as transformers writes it (it re-ties on load). The directory
is written next to its destination and renamed into place, so a crash leaves either the old
directory or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn as nn

from posttrain.models.gpt2 import CONV1D_SUFFIXES, GPT2Config
from posttrain.models.resize import input_embedding
from posttrain.weights.hub import as_dtype


def hf_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], bool]:
    """(Hugging Face state dict on the CPU, whether lm_head is tied to the input embedding)."""
    tied = model.lm_head.weight.data_ptr() == input_embedding(model).weight.data_ptr()
    gpt2 = isinstance(model.config, GPT2Config)
    out = {}
    for key, tensor in model.state_dict().items():
        if tied and key == "lm_head.weight":
            continue  # transformers re-ties it from the embedding on load
        tensor = tensor.detach()
        if gpt2 and key.endswith(CONV1D_SUFFIXES):
            tensor = tensor.t()  # nn.Linear (out, in) -> Conv1D (in, out)
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        out[key] = tensor.to("cpu").contiguous()
    return out, tied


def hf_config(model: nn.Module, dtype: torch.dtype, tied: bool) -> dict:
    """config.json content: config.to_hf(), with the actual tying and dtype."""
    cfg = model.config.to_hf()
    cfg["tie_word_embeddings"] = tied
    cfg["dtype"] = str(dtype).removeprefix("torch.")
    return cfg


def save_pretrained(model: nn.Module, tokenizer, out_dir: str | os.PathLike,
                    dtype: torch.dtype | str | None = None, extra_files: dict[str, str] | None = None) -> Path:
    """Write `model` (and `tokenizer`, when given) as a Hugging Face directory; return its path.

    Files: config.json, model.safetensors, generation_config.json, and the tokenizer's
    tokenizer.json, tokenizer_config.json (with the chat template), special_tokens_map.json;
    `extra_files` (name -> text) are written with them, so the directory appears whole or not at all.
    """
    from safetensors.torch import save_file

    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "config.json").exists())):
        raise FileExistsError(f"{out} exists and is not a model directory; refusing to replace it")
    if tokenizer is not None and len(tokenizer) > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model only {model.config.vocab_size} "
                         "embeddings: call posttrain.models.resize.resize_token_embeddings first")
    dtype = as_dtype(dtype) if dtype is not None else model.lm_head.weight.dtype
    state, tied = hf_state_dict(model, dtype)

    with staged_directory(out) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config(model, dtype, tied), indent=2) + "\n")
        generation = {"bos_token_id": model.config.bos_token_id, "eos_token_id": model.config.eos_token_id}
        if tokenizer is not None:
            stops = tokenizer.stop_ids
            generation = {"bos_token_id": tokenizer.bos_id, "eos_token_id": stops[0] if len(stops) == 1 else stops,
                          "pad_token_id": tokenizer.pad_id}
            tokenizer.save(tmp)
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return out


export = save_pretrained


@contextlib.contextmanager
def staged_directory(out: Path) -> Iterator[Path]:
    """A fresh hidden sibling of `out` to write a model directory into: when the block ends it
    replaces `out` (two renames), and on any error it is removed, so `out` is never half-written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(new: Path, dest: Path) -> None:
    """Move `new` to `dest`, replacing an existing `dest` with two renames."""
    if not dest.exists():
        os.replace(new, dest)
        return
    old = dest.parent / f".{dest.name}.old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(dest, old)
    os.replace(new, dest)
    shutil.rmtree(old, ignore_errors=True)


def export_command(model_or_run: str, out_dir: str, dtype: str = "float32") -> Path:
    """Export a model or a run as a Hugging Face directory (transformers, lm-eval, vLLM load it).

    Args:
        model_or_run: preset alias, hub id, local directory, run directory (runs/<name>) or .gguf file;
            a LoRA run is written merged (its adapter folded into the base, as `posttrain merge`).
        out_dir: where to write the directory (replaced atomically if it holds a model already).
        dtype: float32, bfloat16 or float16.
    """
    from posttrain.generate import STYLE_FILE, saved_style
    from posttrain.weights.hub import load

    model, tokenizer = load(model_or_run, dtype=as_dtype(dtype))
    style = saved_style(model_or_run)  # generate, chat and serve of the export prompt as the run was trained
    path = save_pretrained(model, tokenizer, out_dir,
                           extra_files={STYLE_FILE: json.dumps({"prompt_style": style})} if style else None)
    print(f"exported {model_or_run} -> {path}")
    return path
