"""Every GPU figure the issues ask for, in one call of the device tool, within a time budget.

A lent GPU comes for minutes (15 of device time per session, the machine's start included), so the
checks and benchmarks are one prepared run rather than many calls. Once, on the development machine:

    bash benchmarks/prepare_gpu_session.sh      # fills .bench/: the peers' scripts, their wheels, GPT-2's vocabulary

then with the device tool (carry [".bench"]; the machine has torch, transformers, peft, numpy, ...):

    python3 benchmarks/gpu_session.py                        # everything, by priority, within BUDGET_S
    STAGES=dpo,lora python3 benchmarks/gpu_session.py        # a second call for what the budget cut

Jobs run one after another, by priority: CUDA correctness checks (benchmarks/cuda_checks.py), SFT
beside TRL's SFTTrainer, DPO beside TRL's DPOTrainer, LoRA/QLoRA, classification, generation. Each job
is a script with its environment and a time cap; it gets min(cap, what is left of BUDGET_S) and is
killed past it, so one stuck job cannot eat the lease. Whatever the budget leaves out is listed as
skipped. Every JSON line a job prints goes, tagged with stage and job, into $OUT/results.jsonl as it
comes (so a call cut short still returns what it measured); the jobs' whole output into
$OUT/session.log; and at the end a summary (checks, our figures against the peers' as ratios, MFU,
peak memory at equal tokens per step) is printed and written to $OUT/summary.md, ready for
benchmarks/RESULTS.md.

Env: STAGES (default checks,sft,dpo,lora,classify,generation,memory), BUDGET_S=420, OUT (default
./gpu-session-out), SMOKE=1: tiny configurations on the CPU and no peers (the plumbing check that
tests/test_benchmarks.py runs).
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / ".bench"  # carried to the GPU machine: peers' scripts, wheels, encoder.json/vocab.bpe
SITE = Path("/tmp/posttrain-bench-site")  # where the carried wheels are installed there
STAGES = ("checks", "sft", "dpo", "lora", "classify", "generation", "memory")


@dataclass
class Job:
    stage: str
    name: str
    script: str  # relative to the repository root
    env: dict = field(default_factory=dict)
    cap_s: int = 120
    args: tuple = ()
    peer: bool = False  # a TRL baseline: needs CUDA and the carried wheels


def gpu_jobs() -> list[Job]:
    """The GPU plan. The peers' data sizes are cut from their defaults (N_EX 4000, N_PAIRS 2000) so
    that everything fits one lease; ours run on the same generators with the same sizes."""
    sft = dict(N_EX="2000", SIZES="124M,355M")
    dpo = dict(N_PAIRS="400")
    return [
        Job("checks", "cuda-checks", "benchmarks/cuda_checks.py", cap_s=210),
        Job("sft", "peer-trl-packing", ".bench/peer_sft.py", dict(sft, MODES="trl-packing"), 150, peer=True),
        Job("sft", "packed-compiled", "benchmarks/sft_throughput.py", dict(sft, MODES="packed", COMPILE="1"), 150),
        Job("sft", "padding", "benchmarks/sft_throughput.py", dict(sft, MODES="padding", STEPS="60"), 60),
        # TRL packs 8 rows of 1024 with activation checkpointing (SFTConfig's default): our peak
        # memory at the same tokens per step, with the same memory saving switched on.
        Job("sft", "packed-8x1024-checkpointed", "benchmarks/sft_throughput.py",
            dict(sft, MODES="packed", BATCH="8", ACT_CKPT="1", STEPS="25", WARMUP="5"), 60),
        Job("dpo", "peer-trl-dpo", ".bench/peer_dpo.py", dpo, 120, args=("124M", "355M"), peer=True),
        Job("dpo", "dpo", "benchmarks/dpo_throughput.py",
            dict(dpo, SIZES="124M,355M", MODES="padding,packed", REFERENCE="memory"), 120),
        Job("lora", "full-lora-qlora", "benchmarks/lora_throughput.py",
            dict(SIZES="gpt2-medium,smollm2-135m,smollm2-360m", STEPS="12", WARMUP="3"), 120),
        Job("classify", "classify", "benchmarks/classify_throughput.py", dict(SIZES="124M,355M", N_EX="1000"), 60),
        Job("generation", "generation", "benchmarks/generation.py", dict(BATCH="64", NEW="128"), 60),
        Job("generation", "eval-generate", "benchmarks/eval_generate.py",
            dict(MODEL="random:gpt2", N="256", BATCH="64", NEW="128"), 60),
        Job("generation", "training-step", "benchmarks/throughput.py", dict(BATCH="16", SEQ="1024", STEPS="10"), 60),
        Job("memory", "sft-step-355M", "benchmarks/memory.py", dict(SIZE="355M", BATCH="16", SEQ="1024", STEPS="3"), 90),
    ]


def smoke_jobs() -> list[Job]:
    """The same scripts at CPU size: checks that every job starts, prints figures and is summarised."""
    tiny_sft = dict(SIZES="tiny", N_EX="40", STEPS="2", WARMUP="1", BATCH="4")
    return [
        Job("checks", "cuda-checks", "benchmarks/cuda_checks.py",
            dict(CHECKS="packed_equals_one_by_one,kv_cache_matches_full_forward,activation_checkpointing"), 120),
        Job("sft", "peer-trl-packing", ".bench/peer_sft.py", {}, 60, peer=True),
        Job("sft", "packed", "benchmarks/sft_throughput.py", dict(tiny_sft, MODES="packed,padding"), 120),
        Job("sft", "packed-checkpointed", "benchmarks/sft_throughput.py",
            dict(tiny_sft, MODES="packed", ACT_CKPT="1"), 120),
        Job("classify", "classify", "benchmarks/classify_throughput.py",
            dict(SIZES="tiny", N_EX="32", STEPS="3", WARMUP="1", BATCH="8", MAX_LENGTH="64"), 120),
    ]


def install_carried_wheels(log) -> str | None:
    """pip-install .bench/*.whl (no index, no dependencies) into SITE; the path for PYTHONPATH."""
    wheels = sorted(BENCH.glob("*.whl"))
    if not wheels:
        return None
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                           "--upgrade", "--target", str(SITE), *map(str, wheels)], capture_output=True, text=True)
    log.write(f"$ pip install {len(wheels)} carried wheels -> {SITE}: exit {done.returncode}\n{done.stderr}\n")
    return str(SITE) if done.returncode == 0 else None


VERSIONS = """
import importlib.metadata as m, json, platform, torch
names = ["torch", "transformers", "peft", "trl", "datasets", "pyarrow", "bitsandbytes", "triton", "numpy"]
versions = {}
for name in names:
    try:
        versions[name] = m.version(name)
    except m.PackageNotFoundError:
        versions[name] = None
problems = {}
for name in ("trl", "datasets", "bitsandbytes"):  # the carried ones: do they import against what is there?
    try:
        __import__(name)
    except Exception as e:
        problems[name] = repr(e)[:300]
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
print(json.dumps({"setup": "versions", "python": platform.python_version(), "gpu": gpu, **versions,
                  "import_errors": problems}))
"""


def record_versions(env: dict, results, log) -> dict:
    """One `setup` row: library versions, the GPU, and whether the carried wheels import there."""
    done = subprocess.run([sys.executable, "-c", VERSIONS], env=env, capture_output=True, text=True, timeout=120)
    log.write(f"$ versions: exit {done.returncode}\n{done.stdout}{done.stderr}\n")
    line = next((l for l in done.stdout.splitlines() if l.startswith("{")), None)
    row = {"stage": "setup", "job": "versions", **(json.loads(line) if line else {"error": done.stderr[-300:]})}
    results.write(json.dumps(row) + "\n")
    results.flush()
    return row


def run_job(job: Job, env: dict, limit_s: float, results, log) -> dict:
    """Run one job in its own process group, killed with its children (TRL's data-loader workers) past
    limit_s; its JSON lines go into results as they come. Returns the job's outcome row."""
    log.write(f"\n$ [{job.stage}/{job.name}] {' '.join(f'{k}={v}' for k, v in job.env.items())} "
              f"python {job.script} {' '.join(job.args)}  (limit {limit_s:.0f} s)\n")
    log.flush()
    started = time.perf_counter()
    deadline = started + limit_s
    proc = subprocess.Popen([sys.executable, str(REPO / job.script), *job.args], cwd=REPO, env={**env, **job.env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    rows, timed_out, pending = 0, False, b""

    def take(line: str) -> None:
        nonlocal rows
        log.write(line + "\n")
        if line.startswith("{"):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                return
            results.write(json.dumps({"stage": job.stage, "job": job.name, **row}) + "\n")
            results.flush()
            rows += 1

    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        while True:
            left = deadline - time.perf_counter()
            if left <= 0:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:  # the group is gone; a straggler elsewhere may hold the pipe
                    pass
                timed_out = True
                break
            if not selector.select(timeout=min(1.0, left)):
                continue
            chunk = os.read(proc.stdout.fileno(), 1 << 16)  # whatever is there: progress bars end lines with \r
            if not chunk:
                break
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                take(line.decode(errors="replace").rstrip("\r"))
    if pending:
        take(pending.decode(errors="replace"))
    proc.wait()
    log.flush()
    return {"stage": job.stage, "job": job.name, "exit": proc.returncode, "timed_out": timed_out, "rows": rows,
            "seconds": round(time.perf_counter() - started, 1)}


# ----------------------------------------------------------------------------------------------
# Summary

def _fmt(v, digits=0):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}" if digits else f"{v:,.0f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def summarize(rows: list[dict], outcomes: list[dict]) -> str:
    """Markdown: the checks, then each benchmark's figures, ours beside the peer's as a ratio."""
    lines = []
    setup = next((r for r in rows if r.get("stage") == "setup"), None)
    if setup:
        shown = {k: v for k, v in setup.items() if k not in ("stage", "job", "setup")}
        lines += ["## Machine and versions", "", f"`{json.dumps(shown)}`", ""]
    lines += ["## Jobs", "", "| stage | job | exit | seconds | rows |", "| --- | --- | --- | --- | --- |"]
    for o in outcomes:
        status = "skipped: " + o["skipped"] if "skipped" in o else ("killed at its limit" if o["timed_out"]
                                                                   else o["exit"])
        lines.append(f"| {o['stage']} | {o['job']} | {status} | {o.get('seconds', '-')} | {o.get('rows', '-')} |")

    checks = [r for r in rows if "check" in r]
    if checks:
        lines += ["", "## Checks", "", "| check | ok | seconds |", "| --- | --- | --- |"]
        lines += [f"| {r['check']} | {r['ok'] if r['ok'] is not None else 'skipped: ' + r.get('skipped', '')} | "
                  f"{r.get('seconds', '-')} |" for r in checks]

    sft = [r for r in rows if r.get("stage") == "sft" and "tok_per_s" in r]
    if sft:
        peers = {r["size"]: r for r in sft if str(r.get("tool", "")).startswith("trl") and r.get("mode") == "packing-bfd"}
        lines += ["", "## SFT (real tokens/s; ratio to TRL SFTTrainer packing from this run)", "",
                  "| tool | mode | size | batch | compile | act. ckpt | tok/s | x TRL packing | MFU | peak GiB | TRL peak GiB |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in sft:
            peer = peers.get(r["size"])
            ratio = f"{r['tok_per_s'] / peer['tok_per_s']:.1f}" if peer and r is not peer else "-"
            lines.append(f"| {r.get('tool')} | {r.get('mode')} | {r['size']} | {r.get('bs')} | {r.get('compile', '-')} | "
                         f"{r.get('activation_checkpointing', '-')} | {_fmt(r['tok_per_s'])} | {ratio} | "
                         f"{_fmt(r.get('mfu'), 3)} | {_fmt(r.get('peak_gib'), 2)} | "
                         f"{_fmt(peer.get('peak_gib'), 2) if peer and r is not peer else '-'} |")

    dpo = [r for r in rows if r.get("stage") == "dpo" and "pairs_per_s" in r]
    if dpo:
        peers = {r["size"]: r for r in dpo if str(r.get("tool", "")).startswith("trl")}
        lines += ["", "## DPO (pairs/s; ratio to TRL DPOTrainer from this run)", "",
                  "| tool | mode | reference | size | pairs/s | x TRL | tok/s | peak GiB |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in dpo:
            peer = peers.get(r["size"])
            ratio = f"{r['pairs_per_s'] / peer['pairs_per_s']:.1f}" if peer and r is not peer else "-"
            lines.append(f"| {r.get('tool')} | {r.get('mode', '-')} | {r.get('reference', 'memory')} | {r['size']} | "
                         f"{_fmt(r['pairs_per_s'], 1)} | {ratio} | {_fmt(r.get('tok_per_s'))} | {_fmt(r.get('peak_gib'), 2)} |")

    memory = [r for r in rows if r.get("stage") == "memory" and "peak_gib" in r]
    if memory:
        lines += ["", "## Peak memory of an SFT step", "", "| size | rows x seq | head | act. ckpt | peak GiB | step s |",
                  "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['size']} | {r['batch']} x {r['seq']} | {r['head']} | {r['activation_checkpointing']} | "
                  f"{_fmt(r['peak_gib'], 2)} | {r['step_s']} |" for r in memory]

    other = [r for r in rows if r.get("stage") in ("lora", "classify", "generation") and "error" not in r
             and any(k.endswith("per_s") for k in r)]
    if other:
        lines += ["", "## LoRA, classification, generation", "", "| job | row |", "| --- | --- |"]
        for r in other:
            shown = {k: v for k, v in r.items() if k not in ("stage", "job")}
            lines.append(f"| {r['job']} | `{json.dumps(shown)}` |")
    errors = [r for r in rows if "error" in r]
    if errors:
        lines += ["", "## Errors", ""] + [f"- {r['stage']}/{r['job']}: `{json.dumps(r)[:300]}`" for r in errors]
    return "\n".join(lines) + "\n"


def main() -> None:
    smoke = os.environ.get("SMOKE", "0") not in ("", "0", "false")
    budget = float(os.environ.get("BUDGET_S", "420"))
    wanted = [s.strip() for s in os.environ.get("STAGES", ",".join(STAGES)).split(",") if s.strip()]
    unknown = sorted(set(wanted) - set(STAGES))
    if unknown:
        raise SystemExit(f"unknown stages {unknown}; known: {', '.join(STAGES)}")
    out = Path(os.environ.get("OUT") or REPO / "gpu-session-out")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PEER_BENCH_DIR": str(BENCH), "GPT2_VOCAB_DIR": str(BENCH)}
    if smoke:
        env["DEVICE"] = "cpu"
        env["PEER_BENCH_DIR"] = os.environ.get("PEER_BENCH_DIR", str(REPO.parent / "shared" / "bench"))
    outcomes: list[dict] = []
    with open(out / "results.jsonl", "w") as results, open(out / "session.log", "w") as log:
        site = None if smoke else install_carried_wheels(log)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "src"), site, os.environ.get("PYTHONPATH")) if p)
        print(json.dumps(record_versions(env, results, log)), flush=True)
        for job in (smoke_jobs() if smoke else gpu_jobs()):
            if job.stage not in wanted:
                continue
            left = budget - (time.perf_counter() - started)
            if job.peer and (smoke or not (REPO / job.script).is_file()):
                outcomes.append({"stage": job.stage, "job": job.name, "skipped": "peers run on the GPU only, from "
                                 ".bench (benchmarks/prepare_gpu_session.sh)"})
            elif left < 20:
                outcomes.append({"stage": job.stage, "job": job.name, "skipped": f"budget: {left:.0f} s left"})
            else:
                outcomes.append(run_job(job, env, min(job.cap_s, left), results, log))
            print(json.dumps(outcomes[-1]), flush=True)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
    summary = summarize(rows, outcomes)
    (out / "summary.md").write_text(summary)
    print(summary)


if __name__ == "__main__":
    main()
