"""What the throughput benchmarks share: GPT-2 shapes, environment options, the peers' data
generators, and a guard that keeps one failing configuration from hiding the others' figures.

The scripts run as `python benchmarks/<name>.py`, so this folder is on sys.path and they
`import common`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
PEAK_FLOPS = 790e12  # H100 bf16 matrix product, measured beside the peers (../shared/bench/README.md)
PAD_ID = 50256  # GPT-2's <|endoftext|>, the peers' pad token
GPT2_SIZES = {"tiny": dict(n_layer=2, n_head=4, n_embd=64),  # for a CPU smoke run
              "124M": dict(n_layer=12, n_head=12, n_embd=768),
              "355M": dict(n_layer=24, n_head=16, n_embd=1024)}


def env_int(name: str, default: int | None) -> int | None:
    """An integer option from the environment; unset or blank gives the default."""
    value = os.environ.get(name, "")
    return int(value) if value.strip() else default


def env_list(name: str, default: str) -> list[str]:
    """A comma-separated option from the environment, blanks dropped."""
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


def peer_function(script: str, name: str) -> Callable:
    """Function `name` of the peers' `script` (e.g. peer_sft.py's make_examples), so both sides of
    a comparison train on identical data. PEER_BENCH_DIR names the folder (default
    ../shared/bench; on the GPU machine the carried .bench)."""
    folder = Path(os.environ.get("PEER_BENCH_DIR", "../shared/bench"))
    path = (folder if folder.is_absolute() else REPO / folder) / script
    if not path.is_file():
        sys.exit(f"{path} not found: set PEER_BENCH_DIR to the folder holding the peers' {script} "
                 f"(default ../shared/bench; on the GPU machine the carried .bench)")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines functions only; trl/transformers are imported inside them
    return getattr(module, name)


def print_guarded(measure: Callable[[], dict], device: torch.device, **labels) -> None:
    """Print `measure()` as one JSON line; on failure print the error under `labels` instead, and in
    both cases drop compiled graphs and cached GPU memory so configurations do not pile up."""
    try:
        print(json.dumps(measure()), flush=True)
    except Exception as e:  # one failing configuration must not hide the others' figures
        traceback.print_exc()
        print(json.dumps(dict(tool="posttrain", **labels, error=repr(e)[:400])), flush=True)
    finally:
        torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def bench_device() -> torch.device:
    """DEVICE from the environment; `auto` (the default) takes CUDA when there is one, as training does."""
    from posttrain.train.run import train_device

    return train_device(os.environ.get("DEVICE", "auto"))


def machine_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's where there is none: every figure says where it was taken."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    return platform.processor() or platform.machine()
