"""The shared training loop on tiny CPU models: accumulation equals a big batch, resume equals an
uninterrupted run, SIGTERM saves, NaN stops, and the run directory gets its files."""

import json
import math
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from posttrain.models.gpt2 import GPT2Config
from posttrain.models.registry import build_model
from posttrain.report import plot_run
from posttrain.runlog import read_jsonl, write_config
from posttrain.train.loop import TrainConfig, forward_backward, train
from posttrain.train.losses import IGNORE_INDEX, count_targets, counts, sft_loss
from posttrain.train.optim import build_optimizer, build_scheduler, param_groups
from posttrain.weights.checkpoint import load_checkpoint

VOCAB = 97


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64))


def make_batch(rows: torch.Tensor, prompt_lens: list[int]) -> dict:
    """(B, T+1) token rows -> a shifted batch whose first prompt_lens[b] targets are not trained."""
    targets = rows[:, 1:].clone()
    for b, n in enumerate(prompt_lens):
        targets[b, :n] = IGNORE_INDEX
    T = targets.shape[1]
    return {"input_ids": rows[:, :-1].clone(), "targets": targets,
            "position_ids": torch.arange(T).expand(len(rows), T).clone(), "document_ids": None}


class Shuffled:
    """A batch source in the data pipeline's shape: len() micro-batches, reshuffled per epoch by seed."""

    def __init__(self, n_examples: int = 12, batch_size: int = 2, seq_len: int = 16, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.rows = torch.randint(0, VOCAB, (n_examples, seq_len + 1), generator=g)
        self.prompt_lens = torch.randint(0, seq_len - 2, (n_examples,), generator=g).tolist()
        self.batch_size, self.seed = batch_size, seed

    def __len__(self) -> int:
        return math.ceil(len(self.rows) / self.batch_size)

    def epoch(self, epoch: int, start: int = 0):
        order = torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(self.seed * 1000 + epoch))
        for i in range(start, len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            yield make_batch(self.rows[idx], [self.prompt_lens[j] for j in idx])


def noisy_sft_loss(model, batch):
    """SFT loss scaled by a random factor: makes the run depend on the torch RNG, which resume must restore."""
    loss_sum, n, metrics = sft_loss(model, batch)
    return loss_sum * (1 + 0.5 * torch.rand(())), n, metrics


def quiet(**kw) -> TrainConfig:
    return TrainConfig(**{"lr": 1e-3, "progress": False, "log_every": 1, **kw})


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r}


def test_accumulation_equals_one_big_batch(tmp_path):
    g = torch.Generator().manual_seed(3)
    rows = torch.randint(0, VOCAB, (4, 17), generator=g)
    b1 = make_batch(rows[:2], [12, 9])   # 4 + 7 targets
    b2 = make_batch(rows[2:], [1, 0])    # 15 + 16 targets: unequal counts are the point
    big = make_batch(rows, [12, 9, 1, 0])
    units = count_targets(b1) + count_targets(b2)
    assert units == count_targets(big) == 42

    # gradients of one step
    a, b = tiny_model(), tiny_model()
    forward_backward(a, [b1, b2], sft_loss, units, torch.device("cpu"))
    forward_backward(b, [big], sft_loss, units, torch.device("cpu"))
    diffs = [(p.grad - q.grad).abs().max().item() for p, q in zip(a.parameters(), b.parameters())]
    assert max(diffs) <= 1e-6
    # a mean per micro-batch would weight b1's 11 tokens like b2's 31: the test can tell
    c = tiny_model()
    for mb in (b1, b2):
        loss_sum, n, _ = sft_loss(c, mb)
        (loss_sum / n / 2).backward()
    assert max((p.grad - q.grad).abs().max().item() for p, q in zip(c.parameters(), b.parameters())) > 1e-4

    # parameters after one full optimizer step through train(): AdamW, decay, clipping and all. Adam's
    # first update is lr * g / (|g| + eps): for gradients near 1e-8 it turns fp32 rounding of g into
    # differences of up to ~lr * 1e-3, so lr is 1e-4 to keep them inside the 1e-6 budget.
    cfg = dict(max_steps=1, weight_decay=0.1, max_grad_norm=0.5, tensorboard=False, lr=1e-4)
    a, b = tiny_model(), tiny_model()
    train(a, quiet(grad_accum=2, **cfg), [b1, b2], sft_loss, tmp_path / "accum")
    train(b, quiet(grad_accum=1, **cfg), [big], sft_loss, tmp_path / "big")
    assert max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters())) <= 1e-6
    assert losses(tmp_path / "accum")[1] == pytest.approx(losses(tmp_path / "big")[1], abs=1e-6)


def packed_loader():
    """The data pipeline's own loader: packed rows with document ids, shuffled per epoch."""
    from posttrain.data.batching import BatchLoader
    from posttrain.data.tokenize import TokenizedDataset

    g = torch.Generator().manual_seed(4)
    examples = []
    for _ in range(24):
        length = int(torch.randint(4, 20, (), generator=g))
        prompt = int(torch.randint(1, length, (), generator=g))
        examples.append((torch.randint(1, VOCAB, (length,), generator=g).tolist(),
                         [False] * prompt + [True] * (length - prompt)))
    return BatchLoader(TokenizedDataset.from_examples(examples), mode="packed", batch_size=2, max_length=32, seed=3)


@pytest.mark.parametrize("source", ["shuffled", "packed-loader"])
def test_resume_equals_uninterrupted(tmp_path, source):
    """8 steps straight vs. a crash in step 6 (checkpoint at 4, mid-epoch) and a resume to 8."""
    make_source = Shuffled if source == "shuffled" else packed_loader
    cfg = dict(max_steps=8, grad_accum=2, warmup_steps=2, schedule="cosine", min_lr_ratio=0.1, weight_decay=0.1,
               save_every=4)
    steps_per_epoch = math.ceil(len(make_source()) / 2)
    assert 8 > steps_per_epoch > 1 and 4 % steps_per_epoch  # crosses epochs; the checkpoint is mid-epoch
    straight = tiny_model()
    train(straight, quiet(**cfg), make_source(), noisy_sft_loss, tmp_path / "straight")

    def crashing_loss(model, batch):
        if len(read_jsonl(tmp_path / "resumed/metrics.jsonl")) == 5:  # steps 1-5 done: crash in step 6
            raise RuntimeError("simulated crash")
        return noisy_sft_loss(model, batch)

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny_model(), quiet(**cfg), make_source(), crashing_loss, tmp_path / "resumed")
    assert sorted(losses(tmp_path / "resumed")) == [1, 2, 3, 4, 5]   # step 5 logged, not checkpointed
    state = json.loads((tmp_path / "resumed/checkpoints/last/state.json").read_text())
    assert (state["step"], state["epoch"], state["batch"]) == (4, 4 // steps_per_epoch, 4 % steps_per_epoch * 2)

    torch.manual_seed(123)  # resume must not depend on the RNG state it finds
    resumed = tiny_model(seed=7)  # weights come from the checkpoint
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same settings: no "changed settings" warning
        summary = train(resumed, quiet(**cfg, resume=True), make_source(), noisy_sft_loss, tmp_path / "resumed")
    assert summary["resumed_from"] == 4 and summary["steps"] == 8
    steps = [r["step"] for r in read_jsonl(tmp_path / "resumed/metrics.jsonl")]
    assert steps == list(range(1, 9))  # the crashed run's step 5 was dropped, then logged again
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "resumed/tb"))
    events.Reload()  # TensorBoard shows each step once too: the crashed attempt's step 5 is purged
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [
        (k, pytest.approx(v)) for k, v in sorted(losses(tmp_path / "straight").items())]


SIGTERM_SCRIPT = """
import sys, time
sys.path.insert(0, {tests!r})
from test_loop import Shuffled, tiny_model, quiet
from posttrain.train.loop import TrainingInterrupted, train
from posttrain.train.losses import sft_loss

def slow_loss(model, batch):
    time.sleep(0.03)
    return sft_loss(model, batch)

try:
    s = train(tiny_model(), quiet(max_steps=40, tensorboard=False, resume=sys.argv[2] == "1"), Shuffled(),
              slow_loss, sys.argv[1])
    print("DONE", s["steps"], s["resumed_from"], flush=True)
except TrainingInterrupted as e:
    print("INTERRUPTED", e.step, flush=True)
    sys.exit(128 + e.signum)
"""


def test_sigterm_saves_checkpoint_then_resume_finishes(tmp_path):
    script = tmp_path / "run_tiny.py"
    script.write_text(SIGTERM_SCRIPT.format(tests=str(Path(__file__).parent)))
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(script), str(run_dir), "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while len(read_jsonl(run_dir / "metrics.jsonl")) < 3:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    stopped_at = int(out.split("INTERRUPTED ")[1])
    assert 3 <= stopped_at < 40
    state = json.loads((run_dir / "checkpoints/last/state.json").read_text())
    assert state["step"] == stopped_at == read_jsonl(run_dir / "metrics.jsonl")[-1]["step"]

    proc = subprocess.run([sys.executable, str(script), str(run_dir), "1"], capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["DONE", "40", str(stopped_at)]
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")] == list(range(1, 41))


def test_nan_loss_stops_naming_the_step(tmp_path):
    calls = 0

    def poisoned(model, batch):
        nonlocal calls
        calls += 1
        loss_sum, n, m = sft_loss(model, batch)
        return (loss_sum * float("nan") if calls == 3 else loss_sum), n, m

    model = tiny_model()
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 3 \(epoch 0, micro-batches 2-2\)"):
        train(model, quiet(max_steps=10, save_every=1, tensorboard=False), Shuffled(), poisoned, tmp_path / "run")
    # the update was not applied, and the last checkpoint is the good step before
    assert all(torch.isfinite(p).all() for p in model.parameters())
    state = load_checkpoint(tmp_path / "run/checkpoints/last", tiny_model(seed=1), restore_rng=False)
    assert state["step"] == 2


def test_unwritable_run_dir_fails_before_training(tmp_path):
    (tmp_path / "file").write_text("x")
    calls = []
    with pytest.raises(OSError, match=f"output directory {tmp_path / 'file' / 'run'} is not writable"):
        train(tiny_model(), quiet(max_steps=2), Shuffled(),
              lambda m, b: calls.append(1) or sft_loss(m, b), tmp_path / "file" / "run")
    assert calls == []


@pytest.mark.parametrize("mode", ["padding", "packed", "concat"])
def test_tokens_seen_counts_real_tokens_not_pads(tmp_path, mode):
    from posttrain.data.batching import BatchLoader
    from posttrain.data.tokenize import TokenizedDataset

    examples = [([3] * n, [False] + [True] * (n - 1)) for n in (5, 9, 2, 7, 4, 11)]
    loader = BatchLoader(TokenizedDataset.from_examples(examples), mode=mode, batch_size=2, max_length=16, seed=0)
    train(tiny_model(), quiet(epochs=1, log_every=1, tensorboard=False), loader, sft_loss, tmp_path / "run")
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert rows[-1]["tokens_seen"] == 5 + 9 + 2 + 7 + 4 + 11  # not rows x padded length


def test_loss_goes_down_on_a_repeated_batch(tmp_path):
    batch = next(Shuffled(n_examples=4, batch_size=4).epoch(0))
    train(tiny_model(), quiet(lr=3e-3, max_steps=40, warmup_steps=4, tensorboard=False), [batch], sft_loss,
          tmp_path / "run")
    curve = losses(tmp_path / "run")
    assert len(curve) == 40 and curve[40] < 0.5 * curve[1]


def test_run_directory_files(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "runs" / "tiny-sft"
    cfg = quiet(epochs=2, eval_every=3, log_every=2, save_every=5, lr=2e-3)
    write_config(run_dir, {"train": cfg, "model": {"name": "tiny", "path": Path("/x")}})
    saved = []

    def sample_fn(model, step):
        assert not model.training
        return [{"prompt": "hi", "completion": f"at {step}"}]

    def save_final(model, path):
        saved.append(path)
        path.mkdir()
        (path / "marker").write_text("ok")

    summary = train(tiny_model(), cfg, Shuffled(n_examples=16, batch_size=2), sft_loss, run_dir,
                    val_data=list(Shuffled(n_examples=6, batch_size=4, seed=9).epoch(0)),
                    sample_fn=sample_fn, save_final=save_final)
    assert summary["steps"] == 16 and saved == [run_dir / "model"] and (run_dir / "model/marker").is_file()

    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [2, 3, 4, 6, 8, 9, 10, 12, 14, 15, 16]  # log every 2, eval every 3, the end
    for r in rows:
        assert {"step", "epoch", "tokens_seen", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(r)
    val_steps = [r["step"] for r in rows if "val_loss" in r]
    assert val_steps == [3, 6, 9, 12, 15, 16]
    assert rows[-1]["tokens_seen"] == 2 * 16 * 16 and rows[-1]["epoch"] == 2.0
    best = min((r["val_loss"], r["step"]) for r in rows if "val_loss" in r)
    assert (summary["best"], summary["best_step"]) == best
    assert json.loads((run_dir / "checkpoints/best/state.json").read_text())["best_step"] == best[1]
    # best is a complete checkpoint, like last: weights, optimizer, scheduler, RNG, data position
    model = tiny_model(seed=5)
    optimizer = build_optimizer(param_groups(model, cfg.weight_decay), cfg.lr)
    scheduler = build_scheduler(optimizer, cfg.warmup_steps, 16)
    state = load_checkpoint(run_dir / "checkpoints/best", model, optimizer, scheduler, restore_rng=False)
    assert (state["step"], state["batch"]) == (best[1], best[1] % 8) and optimizer.state and scheduler.last_epoch == best[1]
    assert json.loads((run_dir / "checkpoints/last/state.json").read_text())["step"] == 16
    # val loss is the token-weighted mean over the whole val set, with the final weights
    final = tiny_model(seed=5)
    load_checkpoint(run_dir / "checkpoints/last", final, restore_rng=False)
    with torch.no_grad():
        parts = [sft_loss(final, b) for b in Shuffled(n_examples=6, batch_size=4, seed=9).epoch(0)]
    assert rows[-1]["val_loss"] == pytest.approx(sum(p[0].item() for p in parts) / sum(int(p[1]) for p in parts),
                                                 rel=1e-6)

    samples = read_jsonl(run_dir / "samples.jsonl")
    assert [s["step"] for s in samples] == val_steps and samples[0]["completion"] == "at 3"
    for name in ("loss_vs_step.png", "loss_vs_tokens.png"):
        assert (run_dir / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [r["step"] for r in rows]
    assert [e.step for e in events.Scalars("val/loss")] == val_steps
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["train"]["lr"] == 2e-3 and config["train"]["betas"] == [0.9, 0.999]
    assert config["model"]["path"] == "/x"

    with pytest.raises(FileExistsError, match=r"already holds a run.*TrainConfig\(resume=True\)"):
        train(tiny_model(), cfg, Shuffled(), sft_loss, run_dir)


def test_per_example_loss_and_best_by_metric_max(tmp_path):
    """A classification-like loss counts examples, not tokens; best follows a metric with mode max."""

    @counts(lambda b: b["input_ids"].shape[0])
    def last_token_loss(model, batch):
        logits = model(batch["input_ids"])[:, -1]  # (B, V)
        labels = batch["targets"][:, -1]
        correct = (logits.argmax(-1) == labels).sum()
        return torch.nn.functional.cross_entropy(logits, labels, reduction="sum"), len(labels), {"correct": correct}

    data = Shuffled(n_examples=8, batch_size=4)
    summary = train(tiny_model(), quiet(max_steps=6, eval_every=2, lr=3e-3, best_metric="val_correct",
                                        best_mode="max", tensorboard=False),
                    data, last_token_loss, tmp_path / "run", val_data=list(data.epoch(0)))
    rows = [r for r in read_jsonl(tmp_path / "run/metrics.jsonl") if "val_correct" in r]
    assert all(0.0 <= r["val_correct"] <= 1.0 and "correct" in r for r in rows)  # sums / examples = accuracy
    best = max(rows, key=lambda r: (r["val_correct"], -r["step"]))
    assert summary["best"] == best["val_correct"] and summary["best_step"] == best["step"]


def test_mismatched_unit_count_is_an_error(tmp_path):
    def per_token_but_says_nothing(model, batch):
        loss_sum, n, m = sft_loss(model, batch)
        return loss_sum, batch["input_ids"].shape[0], m

    with pytest.raises(ValueError, match="reported 2 units at step 1 but counted"):
        train(tiny_model(), quiet(max_steps=2, tensorboard=False), Shuffled(), per_token_but_says_nothing,
              tmp_path / "run")


def test_precisions_on_cpu(tmp_path):
    with pytest.raises(ValueError, match="precision 'fp8' is unknown"):
        train(tiny_model(), quiet(max_steps=1, precision="fp8"), Shuffled(), sft_loss, tmp_path / "fp8")
    model = tiny_model()
    s = train(model, quiet(max_steps=3, precision="bf16-true", tensorboard=False), Shuffled(), sft_loss,
              tmp_path / "bf16-true")
    assert model.lm_head.weight.dtype == torch.bfloat16 and math.isfinite(s["loss"])
    model = tiny_model()
    s = train(model, quiet(max_steps=3, precision="bf16-mixed", tensorboard=False), Shuffled(), sft_loss,
              tmp_path / "bf16-mixed")
    assert model.lm_head.weight.dtype == torch.float32 and math.isfinite(s["loss"]) and s["precision"] == "bf16-mixed"
    # mixed precision changes the numbers a little, not the step: its first loss is near fp32's
    fp32 = tiny_model()
    train(fp32, quiet(max_steps=1, tensorboard=False), Shuffled(), sft_loss, tmp_path / "fp32")
    assert losses(tmp_path / "bf16-mixed")[1] == pytest.approx(losses(tmp_path / "fp32")[1], rel=2e-2)


class InfiniteGradient(torch.autograd.Function):
    """Identity forward, infinite gradient backward: an fp16 gradient overflow on demand."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


@pytest.mark.filterwarnings("ignore:precision fp16 on a CPU")  # expected here: the CPU stands in for CUDA
def test_fp16_scales_the_loss_and_skips_overflowing_steps(tmp_path):
    """fp16 runs under a GradScaler (on the CPU too): the loss is scaled for backward and unscaled before
    clipping (the logged grad norm is fp32's, not 65536 times it); a step whose gradients overflow is
    skipped, weights untouched, and the scale halves."""
    def grad_norm(run):
        return read_jsonl(tmp_path / run / "metrics.jsonl")[0]["grad_norm"]

    fp16, fp32 = tiny_model(), tiny_model()
    s = train(fp16, quiet(max_steps=1, precision="fp16", tensorboard=False), Shuffled(), sft_loss, tmp_path / "fp16")
    train(fp32, quiet(max_steps=1, tensorboard=False), Shuffled(), sft_loss, tmp_path / "fp32")
    assert s["precision"] == "fp16" and fp16.lm_head.weight.dtype == torch.float32  # fp32 master weights
    assert grad_norm("fp16") == pytest.approx(grad_norm("fp32"), rel=2e-2)
    assert losses(tmp_path / "fp16")[1] == pytest.approx(losses(tmp_path / "fp32")[1], rel=2e-2)
    assert not all(torch.equal(p, q) for p, q in zip(fp16.parameters(), tiny_model().parameters()))  # it stepped

    def overflowing(model, batch):
        loss_sum, n, metrics = sft_loss(model, batch)
        return InfiniteGradient.apply(loss_sum), n, metrics

    model = tiny_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the scheduler steps although the optimizer skipped: expected here
        train(model, quiet(max_steps=1, precision="fp16", tensorboard=False), Shuffled(), overflowing,
              tmp_path / "overflow")
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), tiny_model().parameters()))
    scales = {run: torch.load(tmp_path / run / "checkpoints/last/optimizer.pt", weights_only=True)["scaler"]["scale"]
              for run in ("fp16", "overflow")}
    assert scales == {"fp16": 2.0 ** 16, "overflow": 2.0 ** 15}


def test_progress_bar_shows_loss_lr_tokens_per_second_and_eta(tmp_path, capsys):
    train(tiny_model(), quiet(max_steps=4, progress=True, tensorboard=False), Shuffled(), sft_loss, tmp_path / "run")
    final = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert re.search(r"4/4 \[\d\d:\d\d<\d\d:\d\d", final), final  # steps done, [elapsed<ETA
    for key in ("loss=", "lr=", "tok/s="):
        assert key in final, final


def test_trainable_params_freezes_the_rest(tmp_path):
    model, before = tiny_model(), tiny_model()
    head = list(model.transformer.h[1].mlp.parameters())
    train(model, quiet(max_steps=2, tensorboard=False), Shuffled(), sft_loss, tmp_path / "run", trainable_params=head)
    changed = {n for (n, p), q in zip(model.named_parameters(), before.parameters()) if not torch.equal(p, q)}
    assert changed == {"transformer.h.1.mlp.c_fc.weight", "transformer.h.1.mlp.c_fc.bias",
                       "transformer.h.1.mlp.c_proj.weight", "transformer.h.1.mlp.c_proj.bias"}


def test_compiled_blocks_train_like_eager(tmp_path):
    """compile=<backend> compiles each block in place (aot_eager: the graph capture without inductor's C++ build)."""
    eager, compiled = tiny_model(), tiny_model()
    train(eager, quiet(max_steps=2, tensorboard=False), Shuffled(), sft_loss, tmp_path / "eager")
    train(compiled, quiet(max_steps=2, tensorboard=False, compile="aot_eager"), Shuffled(), sft_loss,
          tmp_path / "compiled")
    assert list(compiled.state_dict()) == list(eager.state_dict())
    assert losses(tmp_path / "compiled")[2] == pytest.approx(losses(tmp_path / "eager")[2], abs=1e-5)


def test_plot_run_from_metrics(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 1, "tokens_seen": 100, "loss": 3.0}, {"step": 2, "tokens_seen": 200, "loss": 2.5, "val_loss": 2.7},
    ]) + '{"step": 3, "tokens')  # a torn last line from a killed run is skipped
    paths = plot_run(tmp_path)
    assert [p.name for p in paths] == ["loss_vs_step.png", "loss_vs_tokens.png"]
    assert all(p.stat().st_size > 1000 for p in paths)
