"""What every trainer (sft, dpo, classify) does before its task begins: name the run directory,
refuse to overwrite an earlier run, pick the device, load the model and cap the data's max length
at the model's context."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch

from posttrain.runlog import METRICS_FILE
from posttrain.weights.checkpoint import ensure_writable_dir, resolve_checkpoint


def resolve_run_dir(run_dir: str | None, runs: str, name: str | None, task: str, model: str) -> Path:
    """`run_dir` when given, else RUNS/NAME, NAME defaulting to <task>-<model>-<time>."""
    if run_dir:
        return Path(run_dir)
    return Path(runs) / (name or f"{task}-{Path(model).name}-{time.strftime('%Y%m%d-%H%M%S')}")


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """The run directory takes writes and holds no earlier run (unless resuming it).

    Checked before config.yaml is written, so a refused run leaves an earlier run's files as they were.
    """
    ensure_writable_dir(run_dir)
    if not resume and ((run_dir / METRICS_FILE).exists()
                       or resolve_checkpoint(run_dir / "checkpoints" / "last") is not None):
        raise FileExistsError(f"{run_dir} already holds a run (metrics.jsonl or checkpoints/last); pass "
                              f"--train.resume true (TrainConfig(resume=True)) to continue it, or choose "
                              f"another --run_dir / --name")


def train_device(name: str) -> torch.device:
    """The device a `train.device` setting names; auto: CUDA when there is one."""
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def load_capped(model: str, data):
    """The model, its tokenizer, and the data config with max_length capped at the model's context:
    longer rows would index past the model's positions."""
    from posttrain.weights import load

    net, tokenizer = load(model)
    context = net.config.max_length
    if data.max_length > context:
        print(f"data.max_length {data.max_length} is longer than the model's context; using {context}")
        data = replace(data, max_length=context)
    return net, tokenizer, data
