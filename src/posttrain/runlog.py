"""What a run writes while it trains: metrics.jsonl, TensorBoard events, samples.jsonl, a progress bar,
and the resolved config.yaml.

metrics.jsonl is the source of truth (one JSON object per logged step, plain to grep or load with
pandas); TensorBoard (`tb/`) and the PNG plots (`report.py`) are views of the same numbers.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
from pathlib import Path

import yaml
from tqdm.auto import tqdm

from posttrain.weights.checkpoint import atomic_write

METRICS_FILE, SAMPLES_FILE, CONFIG_FILE, TB_DIR = "metrics.jsonl", "samples.jsonl", "config.yaml", "tb"


def _plain(obj):
    """Dataclasses, paths, tuples, enums, dtypes -> YAML/JSON-safe builtins."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_plain(v) for v in obj]
    if isinstance(obj, enum.Enum):
        return _plain(obj.value)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:  # 0-d tensors and numpy scalars
        return obj.item()
    return str(obj)  # Path, torch.dtype, torch.device, ...


def write_config(run_dir: str | os.PathLike, config) -> Path:
    """Write the resolved config (a dict or dataclass) to <run_dir>/config.yaml, atomically."""
    path = Path(run_dir) / CONFIG_FILE
    atomic_write(path, yaml.safe_dump(_plain(config), sort_keys=False, allow_unicode=True))
    return path


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Rows of a JSON-lines file; a torn last line (a killed writer) is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _drop_after(path: Path, step: int) -> None:
    """Forget rows logged after `step` (rewritten atomically)."""
    if path.is_file():
        keep = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
        atomic_write(path, "".join(json.dumps(r) + "\n" for r in keep))


class RunLog:
    """Appends metric rows to metrics.jsonl and TensorBoard, and drives the progress bar."""

    def __init__(self, run_dir: str | os.PathLike, total_steps: int, start_step: int = 0,
                 tensorboard: bool = True, progress: bool = True):
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / METRICS_FILE
        self.samples_path = self.run_dir / SAMPLES_FILE
        # Resuming from step s: rows and events after s came from an attempt that died before its
        # next checkpoint; the resumed run logs those steps again.
        _drop_after(self.metrics_path, start_step)
        _drop_after(self.samples_path, start_step)
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imported late: it loads tensorboard
            self.tb = SummaryWriter(str(self.run_dir / TB_DIR), purge_step=start_step + 1, flush_secs=10)
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                        disable=not progress, desc=self.run_dir.name)

    def log(self, row: dict) -> None:
        """One JSON line (written at once: a crash loses nothing logged) and its scalars in TensorBoard
        (flushed every 10 s and on close)."""
        row = _plain(row)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for key, value in row.items():
                if key == "step" or not isinstance(value, (int, float)) or isinstance(value, bool):
                    continue
                tag = f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}"
                self.tb.add_scalar(tag, value, row["step"])

    def samples(self, step: int, rows: list[dict]) -> None:
        with open(self.samples_path, "a") as f:
            for r in rows:
                f.write(json.dumps(_plain({"step": step, **r})) + "\n")

    def progress(self, steps: int = 1, **postfix) -> None:
        """Advance the bar (tqdm's ETA comes from its step rate) and show loss, lr, tokens/s."""
        if postfix:
            self.bar.set_postfix({k: _short(v) for k, v in postfix.items()}, refresh=False)
        self.bar.update(steps)

    def message(self, text: str) -> None:
        self.bar.write(text)

    def close(self) -> None:
        self.bar.close()
        if self.tb is not None:
            self.tb.close()


def _short(v) -> str:
    if isinstance(v, float):
        if math.isfinite(v) and v != 0 and (abs(v) < 1e-2 or abs(v) >= 1e5):
            return f"{v:.2e}"
        return f"{v:.4g}"
    return str(v)
