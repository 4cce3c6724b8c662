"""Training checkpoints, written atomically: a directory is either the old one or the new one, whole.

A checkpoint directory holds
  model.safetensors   the model's state dict (tied weights stored once); for a LoRA model (peft),
                      only its adapters and modules_to_save (posttrain.lora.checkpoint_tensors)
  optimizer.pt        optimizer, scheduler and grad-scaler state (tensors, numbers, lists only;
                      loaded with torch.load(weights_only=True), which executes no pickled code)
  rng.pt              random states of python, numpy, torch and every CUDA device
  state.json          step, data position, tokens seen, best metric, ... (what the loop passes)

It is written into a temporary sibling directory, every file and the directory are fsynced, and
only then renamed into place, so a crash or a full disk mid-write leaves the previous checkpoint
as it was. Replacing an existing directory takes two renames (old aside, new in); should the
process die between them, `resolve_checkpoint` finds the set-aside one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import safetensors
import safetensors.torch
import torch
import torch.nn as nn

from posttrain.lora import checkpoint_tensors, is_lora_model, load_adapter_state_dict

MODEL_FILE, OPTIM_FILE, RNG_FILE, STATE_FILE = "model.safetensors", "optimizer.pt", "rng.pt", "state.json"


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)  # directories too: makes their entries (renames) durable
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write a file so that readers see the old content or the new, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def ensure_writable_dir(path: str | os.PathLike) -> Path:
    """Create `path` and prove it takes a write, or say clearly which directory cannot."""
    path = Path(path)
    probe = path / ".write-probe"
    try:
        path.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"posttrain write probe\n" * 64)
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        raise OSError(e.errno, f"output directory {path} is not writable ({e.strerror or e}); "
                               f"free space there or choose another output directory") from e
    return path


def rng_state() -> dict:
    """Every random state that training consumes (data order is the data source's own business)."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | os.PathLike, model: nn.Module, state: dict,
                    optimizer: torch.optim.Optimizer | None = None, scheduler=None, scaler=None) -> Path:
    """Write a checkpoint directory atomically (see the module docstring); returns its path.

    Without an optimizer (a checkpoint kept for its weights alone) optimizer.pt is left out.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        adapter = checkpoint_tensors(model)  # LoRA: the adapters (and a classifier's head) only
        if adapter is not None:
            safetensors.torch.save_file(adapter, str(tmp / MODEL_FILE), metadata={"format": "pt", "adapter": "lora"})
        else:
            safetensors.torch.save_model(model, str(tmp / MODEL_FILE), force_contiguous=True)
        if optimizer is not None:
            torch.save({"optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict() if scheduler is not None else None,
                        "scaler": scaler.state_dict() if scaler is not None else None}, tmp / OPTIM_FILE)
        torch.save(rng_state(), tmp / RNG_FILE)
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
        for f in tmp.iterdir():
            _fsync_path(f)
        _fsync_path(tmp)
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(path, old)
            os.rename(tmp, path)
            _fsync_path(path.parent)
            shutil.rmtree(old)
        else:
            os.rename(tmp, path)
            _fsync_path(path.parent)
    except (OSError, safetensors.SafetensorError) as e:  # safetensors reports I/O errors as its own type
        shutil.rmtree(tmp, ignore_errors=True)
        message = (f"could not write checkpoint {path} ({getattr(e, 'strerror', None) or e}); the previous "
                   f"checkpoint there is intact. Free space or choose another output directory")
        raise (OSError(e.errno, message) if getattr(e, "errno", None) else OSError(message)) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def resolve_checkpoint(path: str | os.PathLike) -> Path | None:
    """The checkpoint at `path`, or the one set aside there by an interrupted swap, or None."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    aside = sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime)
    aside = [p for p in aside if (p / STATE_FILE).is_file()]
    return aside[-1] if aside else None


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler=None, scaler=None, restore_rng: bool = True) -> dict:
    """Load what `save_checkpoint` wrote into the given objects; returns the `state` dict."""
    found = resolve_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"no checkpoint at {path} (expected {STATE_FILE} and {MODEL_FILE} there)")
    device = next(model.parameters()).device
    if is_lora_model(model):  # the checkpoint holds the adapters only (save_checkpoint)
        load_adapter_state_dict(model, safetensors.torch.load_file(str(found / MODEL_FILE)), str(found / MODEL_FILE))
        missing = unexpected = None
    else:
        missing, unexpected = safetensors.torch.load_model(model, str(found / MODEL_FILE), strict=False,
                                                           device=str(device))
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {found / MODEL_FILE} does not fit the model: missing keys "
                           f"{sorted(missing)[:5]}, unexpected keys {sorted(unexpected)[:5]}")
    if optimizer is not None:
        if not (found / OPTIM_FILE).is_file():
            raise FileNotFoundError(f"{found} holds no {OPTIM_FILE}: it is a weights-only checkpoint "
                                    f"(e.g. 'best') and cannot resume training")
        blob = torch.load(found / OPTIM_FILE, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(blob["optimizer"])
        if scheduler is not None and blob["scheduler"] is not None:
            scheduler.load_state_dict(blob["scheduler"])
        if scaler is not None and blob["scaler"]:
            scaler.load_state_dict(blob["scaler"])
    if restore_rng:
        set_rng_state(torch.load(found / RNG_FILE, map_location="cpu", weights_only=True))
    return json.loads((found / STATE_FILE).read_text())
