"""posttrain: post-train small causal language models on one GPU or a CPU."""

__version__ = "0.1.0"
