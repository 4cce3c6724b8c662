"""benchmarks/gpu_session.py: the one prepared run of a GPU lease. Its CUDA half cannot run here; its
plumbing can: jobs run by stage within a budget, a job past its limit dies with its children and keeps
what it printed, and the summary puts our figures beside the peers'."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_session():
    spec = importlib.util.spec_from_file_location("gpu_session", REPO / "benchmarks" / "gpu_session.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run_session(tmp_path, **env):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_session.py")], cwd=REPO,
                          env={**os.environ, "SMOKE": "1", "OUT": str(out), **env},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return done.stdout, rows, (out / "summary.md").read_text()


def test_smoke_session_runs_the_checks(tmp_path):
    """The checks stage at CPU size (the benchmarks' own smoke runs are tests/test_benchmarks.py)."""
    stdout, rows, summary = run_session(tmp_path, STAGES="checks")
    checks = [r for r in rows if r["stage"] == "checks"]
    assert [r["check"] for r in checks] == ["packed_equals_one_by_one", "kv_cache_matches_full_forward",
                                           "activation_checkpointing"]
    assert all(r["ok"] is True for r in checks), checks
    assert {r["stage"] for r in rows} == {"setup", "checks"}  # a stage not asked for does not run
    assert "## Checks" in summary and "| packed_equals_one_by_one | True |" in summary


def test_what_the_budget_cannot_hold_is_listed_as_skipped(tmp_path):
    stdout, rows, summary = run_session(tmp_path, BUDGET_S="5")
    assert [r["stage"] for r in rows] == ["setup"]  # the machine's versions, and nothing else
    assert rows[0]["torch"] == __import__("torch").__version__
    outcomes = [json.loads(line) for line in stdout.splitlines() if line.startswith("{") and '"setup"' not in line]
    assert outcomes and all("skipped" in o for o in outcomes)
    assert any(o["skipped"].startswith("budget") for o in outcomes)
    assert "skipped: budget" in summary


def test_a_job_past_its_limit_is_killed_with_its_children_and_keeps_its_lines(tmp_path):
    session = load_session()
    script = tmp_path / "stuck.py"
    marker = tmp_path / "child.pid"
    script.write_text(textwrap.dedent(f"""
        import json, subprocess, sys, time
        print(json.dumps({{"size": "x", "tok_per_s": 1.0}}), flush=True)
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        open({str(marker)!r}, "w").write(str(child.pid))
        print("a progress bar without a newline\\r", end="", flush=True)
        time.sleep(60)
    """))
    job = session.Job("sft", "stuck", str(script))
    results, log = io.StringIO(), io.StringIO()
    started = time.perf_counter()
    outcome = session.run_job(job, dict(os.environ), 4, results, log)
    assert time.perf_counter() - started < 15
    assert outcome["timed_out"] and outcome["rows"] == 1
    assert json.loads(results.getvalue()) == {"stage": "sft", "job": "stuck", "size": "x", "tok_per_s": 1.0}
    assert "a progress bar without a newline" in log.getvalue()
    child = int(marker.read_text())
    time.sleep(0.5)
    state = Path(f"/proc/{child}/stat")
    assert not state.exists() or state.read_text().split()[2] == "Z"  # gone, or a zombie awaiting its reaper


def test_summary_sets_our_figures_beside_the_peers():
    session = load_session()
    rows = [
        {"stage": "sft", "job": "peer", "tool": "trl-1.16 SFTTrainer", "mode": "packing-bfd", "size": "124M", "bs": 8,
         "tok_per_s": 30000, "peak_gib": 2.9},
        {"stage": "sft", "job": "ours", "tool": "posttrain", "mode": "packed", "size": "124M", "bs": 16,
         "tok_per_s": 330000, "mfu": 0.41, "peak_gib": 11.3, "compile": True, "activation_checkpointing": False},
        {"stage": "dpo", "job": "peer", "tool": "trl-1.16 DPOTrainer", "size": "124M", "pairs_per_s": 25.0,
         "tok_per_s": 8000, "peak_gib": 3.4},
        {"stage": "dpo", "job": "ours", "tool": "posttrain", "mode": "padding", "reference": "memory", "size": "124M",
         "pairs_per_s": 300.0, "tok_per_s": 96000, "peak_gib": 5.0},
        {"stage": "checks", "job": "cuda-checks", "check": "flex_vs_sdpa", "ok": False, "seconds": 3.0},
        {"stage": "lora", "job": "lora", "tool": "posttrain", "size": "x", "error": "boom"},
        {"stage": "classify", "job": "classify", "bench": "predict", "size": "124M", "examples_per_s": 5000.0},
    ]
    outcomes = [{"stage": "sft", "job": "ours", "exit": 0, "timed_out": False, "rows": 1, "seconds": 9.0},
                {"stage": "lora", "job": "lora", "skipped": "budget: 3 s left"}]
    text = session.summarize(rows, outcomes)
    ours_sft = next(line for line in text.splitlines() if line.startswith("| posttrain | packed |"))
    assert "| 330,000 | 11.0 | 0.410 | 11.30 | 2.90 |" in ours_sft
    ours_dpo = next(line for line in text.splitlines() if line.startswith("| posttrain | padding |"))
    assert "| 300.0 | 12.0 |" in ours_dpo
    assert "| flex_vs_sdpa | False |" in text
    assert "skipped: budget: 3 s left" in text
    assert "## Errors" in text and "boom" in text
    assert "| classify | `{\"bench\": \"predict\", \"size\": \"124M\", \"examples_per_s\": 5000.0}` |" in text
