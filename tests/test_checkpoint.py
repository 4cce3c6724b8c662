"""Checkpoints: exact round trip (weights, optimizer, scheduler, RNG), atomic replacement under real
write failures (a file-size limit makes the disk "full" mid-write), writability probes."""

import json
import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from posttrain.models.gpt2 import GPT2Config
from posttrain.models.registry import build_model
from posttrain.train.optim import build_optimizer, build_scheduler, param_groups
from posttrain.weights.checkpoint import (MODEL_FILE, OPTIM_FILE, atomic_write, ensure_writable_dir, load_checkpoint,
                                          resolve_checkpoint, save_checkpoint)


def tiny(seed=0):
    torch.manual_seed(seed)
    return build_model(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=97, n_positions=64))


def trained_state(model):
    """Optimizer and scheduler after two real steps, so their state is non-trivial."""
    opt = build_optimizer(param_groups(model, 0.1), lr=1e-3)
    sched = build_scheduler(opt, 1, 10, "cosine", 0.1)
    for _ in range(2):
        model(torch.randint(0, 97, (2, 8))).square().mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return opt, sched


def test_round_trip_restores_everything(tmp_path):
    model = tiny()
    opt, sched = trained_state(model)
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    save_checkpoint(tmp_path / "last", model, {"step": 2, "epoch": 0, "batch": 4}, opt, sched)
    draws = (random.random(), np.random.rand(), torch.rand(3))

    fresh = tiny(seed=1)
    opt2, sched2 = build_optimizer(param_groups(fresh, 0.1), lr=1e-3), None
    sched2 = build_scheduler(opt2, 1, 10, "cosine", 0.1)
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    state = load_checkpoint(tmp_path / "last", fresh, opt2, sched2)
    assert state == {"step": 2, "epoch": 0, "batch": 4}
    assert (random.random(), np.random.rand()) == draws[:2] and torch.equal(torch.rand(3), draws[2])
    for (n, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), n
    assert fresh.lm_head.weight is fresh.transformer.wte.weight  # still tied after loading
    assert sched2.last_epoch == 2 and opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    for p, q in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values()):
        assert torch.equal(p["exp_avg"], q["exp_avg"]) and torch.equal(p["exp_avg_sq"], q["exp_avg_sq"])


def test_weights_only_checkpoint_cannot_resume(tmp_path):
    model = tiny()
    save_checkpoint(tmp_path / "best", model, {"step": 1})
    assert not (tmp_path / "best" / OPTIM_FILE).exists()
    opt = build_optimizer(param_groups(model, 0.0), lr=1e-3)
    with pytest.raises(FileNotFoundError, match="weights-only"):
        load_checkpoint(tmp_path / "best", model, opt)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "nothing", model)


def test_failure_mid_write_keeps_previous_checkpoint(tmp_path):
    """The model file is written, then state.json fails to serialise: nothing of the new one lands."""
    model = tiny()
    save_checkpoint(tmp_path / "last", model, {"step": 1})
    old = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path / "last", model, {"step": 2, "bad": object()})
    assert sorted(os.listdir(tmp_path)) == ["last"]  # no temporary directory left behind
    restored = tiny(seed=3)
    assert load_checkpoint(tmp_path / "last", restored, restore_rng=False) == {"step": 1}
    assert all(torch.equal(restored.state_dict()[k], v) for k, v in old.items())


FULL_DISK_SCRIPT = textwrap.dedent("""
    import resource, signal, sys, torch
    from posttrain.models.gpt2 import GPT2Config
    from posttrain.models.registry import build_model
    from posttrain.weights.checkpoint import save_checkpoint, ensure_writable_dir
    path = sys.argv[1]
    torch.manual_seed(0)
    model = build_model(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=97, n_positions=64))
    save_checkpoint(path, model, {"step": 1})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))  # model file is ~450 kB
    try:
        save_checkpoint(path, model, {"step": 2})
    except OSError as e:
        print("CHECKPOINT-ERROR", e)
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))
    try:
        ensure_writable_dir(sys.argv[2])
    except OSError as e:
        print("PROBE-ERROR", e)
""")


def test_full_disk_mid_write_keeps_previous_checkpoint_and_names_path(tmp_path):
    ckpt, out = tmp_path / "run" / "checkpoints" / "last", tmp_path / "other-run"
    proc = subprocess.run([sys.executable, "-c", FULL_DISK_SCRIPT, str(ckpt), str(out)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    assert f"could not write checkpoint {ckpt}" in lines["CHECKPOINT-ERROR"]
    assert "previous checkpoint there is intact" in lines["CHECKPOINT-ERROR"]
    assert f"output directory {out} is not writable" in lines["PROBE-ERROR"]
    assert sorted(os.listdir(ckpt.parent)) == ["last"]
    model = tiny(seed=0)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = tiny(seed=4)
    assert load_checkpoint(ckpt, fresh, restore_rng=False) == {"step": 1}
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in expected.items())


def test_replacing_a_checkpoint_and_an_interrupted_swap(tmp_path):
    model = tiny()
    save_checkpoint(tmp_path / "last", model, {"step": 1})
    save_checkpoint(tmp_path / "last", model, {"step": 2})
    assert json.loads((tmp_path / "last" / "state.json").read_text()) == {"step": 2}
    assert sorted(os.listdir(tmp_path)) == ["last"]
    # a crash between "old aside" and "new in" leaves only the set-aside copy: it is still found
    os.rename(tmp_path / "last", tmp_path / ".last.old-123")
    assert resolve_checkpoint(tmp_path / "last") == tmp_path / ".last.old-123"
    assert load_checkpoint(tmp_path / "last", tiny(seed=2), restore_rng=False) == {"step": 2}
    assert (tmp_path / ".last.old-123" / MODEL_FILE).is_file()


def test_unwritable_directory_is_named(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match=f"output directory {blocker / 'run'} is not writable"):
        ensure_writable_dir(blocker / "run")
    assert ensure_writable_dir(tmp_path / "ok" / "run").is_dir()
    assert os.listdir(tmp_path / "ok" / "run") == []  # the probe file is gone


def test_atomic_write_replaces_whole_file(tmp_path):
    atomic_write(tmp_path / "x" / "config.yaml", "a: 1\n")
    atomic_write(tmp_path / "x" / "config.yaml", b"a: 2\n")
    assert (tmp_path / "x" / "config.yaml").read_text() == "a: 2\n"
    assert os.listdir(tmp_path / "x") == ["config.yaml"]
