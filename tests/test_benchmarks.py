"""The throughput benchmarks run nowhere else in CI: each one's CPU smoke configuration must still
run and print a figure (not an error line). Nothing here checks a speed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PEERS = REPO.parent / "shared" / "bench"  # the TRL peers' data generators (development machines only)

SMOKE = {
    "classify_throughput.py": dict(SIZES="tiny", N_EX="32", STEPS="3", WARMUP="1", BATCH="8", MAX_LENGTH="64"),
    "lora_throughput.py": dict(SIZES="tiny-gpt2,tiny-llama", MODES="full,lora,qlora", STEPS="2", WARMUP="1",
                               BATCH="2", SEQ="32"),
    "sft_throughput.py": dict(SIZES="tiny", MODES="padding,packed", N_EX="40", STEPS="2", WARMUP="1", BATCH="4",
                              MAX_LENGTH="1024"),  # the peers' examples run up to about 800 tokens
    "memory.py": dict(SIZE="tiny", BATCH="2", SEQ="64", STEPS="1", CKPT="1"),  # both heads; a process each
    "dpo_throughput.py": dict(SIZES="tiny", MODES="padding,packed", REFERENCE="memory,cached", N_PAIRS="16",
                              STEPS="2", WARMUP="1", BATCH="4", MAX_LENGTH="256"),
}
NEEDS_PEERS = {"sft_throughput.py", "dpo_throughput.py"}


@pytest.mark.parametrize("script", sorted(SMOKE))
def test_benchmark_smoke_run_prints_figures(script):
    if script in NEEDS_PEERS and not PEERS.is_dir():
        pytest.skip(f"{PEERS} (the peers' data generators) is not on this machine")
    env = {**os.environ, **SMOKE[script], "DEVICE": "cpu", "PEER_BENCH_DIR": str(PEERS),
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / script)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    figures = [r for r in rows if "size" in r]  # the first line describes the machine and data
    assert figures, done.stdout
    errors = [r for r in figures if "error" in r]
    assert not errors, errors
    measured = [r for r in figures if "skipped" not in r]  # QLoRA says why it cannot run on a CPU
    assert measured and all(any(k.endswith("per_s") and v > 0 for k, v in r.items()) for r in measured), measured
