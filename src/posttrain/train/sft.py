"""Supervised (instruction) fine-tuning: data -> batches -> the shared loop -> a run directory.

`sft(...)`'s typed signature and docstring are the `posttrain sft` command. With no arguments it runs
the offline demo: the packaged SmolLM2-135M-Instruct on posttrain's embedded instruction set, with
exact match on the held-out split measured before and after training.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from posttrain.data.batching import MODES, BatchLoader
from posttrain.data.demo import exact_match
from posttrain.data.formats import records_to_messages
from posttrain.data.sources import load_records
from posttrain.data.tokenize import OVERLONG, SFTData, prepare_sft_data
from posttrain.generate import STYLE_FILE, GenerationConfig, generate_text
from posttrain.lora import (LoraConfig, apply_lora, check_lora, format_counts, is_lora_model, new_tokens_error,
                            save_adapter, trainable_parameters)
from posttrain.models.registry import OFFLINE_DEFAULT
from posttrain.prompts import LOSS_MODES, STYLES, PromptStyle, resize_model_for_tokenizer
from posttrain.runlog import METRICS_FILE, write_config
from posttrain.train.loop import TrainConfig, train
from posttrain.train.losses import sft_loss
from posttrain.weights import load, save_pretrained
from posttrain.weights.checkpoint import atomic_write, ensure_writable_dir, resolve_checkpoint

DEMO_DATA = "demo"


@dataclass
class DataConfig:
    path: str = DEMO_DATA            # file, folder, http(s) URL, hub dataset id, or "demo"
    style: str = "alpaca"            # alpaca | phi3 | chatml | llama2 | template | plain | auto
    loss_on: str = "all"             # all (prompt and response) | response (assistant turns only)
    max_length: int = 1024
    batching: str = "padding"        # padding | packed | concat
    batch_size: int = 8              # rows per micro-batch (grad_accum micro-batches per step)
    group_by_length: bool = False    # padding: batch examples of similar length together
    val_path: str | None = None      # separate validation file (then `path` is all training data)
    test_path: str | None = None
    split: tuple[float, float, float] = (0.85, 0.10, 0.05)  # train, test, val fractions, in order
    shuffle: bool = False            # shuffle records before splitting
    seed: int = 0
    overlong: str = "truncate"       # truncate | drop (both counted and reported)
    skip_invalid: bool = False       # count and skip bad records instead of stopping
    mix_path: str | None = None      # a second dataset blended into train (e.g. pre-training text)
    mix_ratio: float = 0.0
    cache: bool = True               # tokenized data cached on disk


@dataclass
class SampleConfig:
    prompts: int = 3                 # val prompts answered at each evaluation (samples.jsonl)
    max_new_tokens: int = 64
    exact_match: bool = False        # exact match on the held-out split before and after training


# The demo's own settings, for every option the user left at its general default: short exact
# answers need a higher learning rate and far fewer new tokens than open-ended instructions.
DEMO_TRAIN = {"lr": 1e-4, "warmup_steps": 5, "schedule": "cosine", "epochs": 1, "eval_every": 25}
DEMO_SAMPLES = {"max_new_tokens": 16, "exact_match": True}


def with_defaults(config, overrides: dict):
    """`config` with `overrides` applied to the fields still at their class default."""
    default = type(config)()
    return replace(config, **{k: v for k, v in overrides.items() if getattr(config, k) == getattr(default, k)})


def sft(model: str = OFFLINE_DEFAULT, data: DataConfig = DataConfig(), train: TrainConfig = TrainConfig(),
        samples: SampleConfig = SampleConfig(), lora: LoraConfig = LoraConfig(), run_dir: str | None = None,
        runs: str = "runs", name: str | None = None) -> dict:
    """Instruction fine-tuning (SFT); with no arguments, the offline demo.

    The demo fine-tunes SmolLM2-135M-Instruct on posttrain's embedded instruction set and reports exact
    match on its held-out split before and after training.

    Args:
        model: preset alias, hub id, local Hugging Face directory, .gguf file or run directory.
        data: dataset, prompt style, loss masking and batching.
        train: optimizer, schedule, precision, accumulation, evaluation and checkpoints.
        samples: sample generations at each evaluation; exact match before/after.
        lora: LoRA / rsLoRA / DoRA adapters (lora.r > 0; QLoRA: lora.quantize nf4, CUDA); the run's
            model/ then holds the adapter (posttrain merge RUN OUT writes the merged model).
        run_dir: where the run is written (default: RUNS/NAME).
        runs: folder of runs.
        name: run name (default: sft-<model>-<time>).
    """
    return run_sft(model, data, train, samples, run_dir, runs, name, lora)


def run_sft(model: str, data: DataConfig, train_config: TrainConfig, samples: SampleConfig,
            run_dir: str | None, runs: str = "runs", name: str | None = None,
            lora: LoraConfig = LoraConfig()) -> dict:
    demo = data.path == DEMO_DATA
    if demo:
        train_config, samples = with_defaults(train_config, DEMO_TRAIN), with_defaults(samples, DEMO_SAMPLES)
    run_dir = Path(run_dir) if run_dir else Path(runs) / (name or f"sft-{Path(model).name}-{time.strftime('%Y%m%d-%H%M%S')}")
    # Mistakes that need no model to find are reported before minutes of loading and tokenizing.
    check_choices(data)
    check_lora(lora, train_device(train_config))
    check_run_dir(run_dir, train_config.resume)
    net, tokenizer = load(model)
    context = net.config.max_length
    if data.max_length > context:  # longer rows would index past the model's positions
        print(f"data.max_length {data.max_length} is longer than the model's context; using {context}")
        data = replace(data, max_length=context)
    sft_data = prepare_sft_data(data.path, tokenizer, data.style, data.loss_on, data.max_length, data.val_path,
                                data.test_path, tuple(data.split), data.shuffle, data.seed, data.skip_invalid,
                                data.overlong, data.mix_path, data.mix_ratio, cache=data.cache)
    style = sft_data.style
    if resize_model_for_tokenizer(net, tokenizer):
        if lora.enabled:  # the new rows would stay untrained (frozen embeddings)
            raise new_tokens_error(style.name)
        print(f"added special tokens for {style.name}; embeddings resized to {net.config.vocab_size}")
    if lora.enabled:
        net = apply_lora(net, lora, base=model, device=train_device(train_config), seed=train_config.seed)
    else:
        print(f"full fine-tuning: {format_counts(net)}")
    print(sft_data.summary())
    train_batches = BatchLoader(sft_data.train, data.batching, data.batch_size, data.max_length,
                                tokenizer.pad_id, shuffle=True, seed=data.seed, group_by_length=data.group_by_length)
    val_batches = (BatchLoader(sft_data.val, data.batching, data.batch_size, data.max_length, tokenizer.pad_id,
                               shuffle=False) if sft_data.val is not None else None)
    print(f"batching {data.batching}: {train_batches.stats}")
    write_config(run_dir, {"task": "sft", "model": model, "data": asdict(data), "train": asdict(train_config),
                           "samples": asdict(samples), "lora": asdict(lora), "data_report": sft_data.report})

    heldout = demo_heldout() if demo else None
    summary: dict = {"run_dir": str(run_dir)}
    if samples.exact_match and heldout:
        summary["exact_match_before"] = exact_match_rate(net, tokenizer, style, heldout, samples.max_new_tokens)
        print(f"exact match before training: {summary['exact_match_before']:.3f} on {len(heldout)} held-out examples")

    sample_prompts = sample_messages(sft_data, samples.prompts)

    def sample_fn(m, step):
        return answer(m, tokenizer, style, sample_prompts, samples.max_new_tokens)

    def save_final(m, path):
        save_model(m, tokenizer, style, path)

    summary.update(train(net, train_config, train_batches, sft_loss, run_dir, val_data=val_batches,
                         sample_fn=sample_fn if sample_prompts else None, save_final=save_final,
                         trainable_params=trainable_parameters(net) if lora.enabled else None))
    if samples.exact_match and heldout:
        summary["exact_match_after"] = exact_match_rate(net, tokenizer, style, heldout, samples.max_new_tokens)
        print(f"exact match after training: {summary['exact_match_after']:.3f} "
              f"(before: {summary['exact_match_before']:.3f})")
    atomic_write(run_dir / "summary.json", json.dumps(summary, indent=2, default=str))
    print(f"run: {run_dir}  (plots: {run_dir / 'plots'}, model: {run_dir / 'model'})")
    return summary


def check_choices(data: DataConfig) -> None:
    """Raise ValueError naming the allowed values when a data option is not one of them."""
    choices = {"style": (*STYLES, "auto"), "batching": MODES, "loss_on": LOSS_MODES, "overlong": OVERLONG}
    for key, allowed in choices.items():
        value = getattr(data, key)
        if value not in allowed:
            raise ValueError(f"data.{key} {value!r} is unknown; choose one of: {', '.join(allowed)}")


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """The run directory takes writes and holds no earlier run (unless resuming it).

    Checked before config.yaml is written, so a refused run leaves an earlier run's files as they were.
    """
    ensure_writable_dir(run_dir)
    if not resume and ((run_dir / METRICS_FILE).exists()
                       or resolve_checkpoint(run_dir / "checkpoints" / "last") is not None):
        raise FileExistsError(f"{run_dir} already holds a run (metrics.jsonl or checkpoints/last); pass "
                              f"--train.resume true to continue it, or choose another --run_dir / --name")


def demo_heldout() -> list[dict]:
    """The demo's held-out conversations (prompt only) with their reference answers."""
    conversations, _ = records_to_messages(load_records("demo:heldout"))
    return [{"messages": c[:-1], "reference": c[-1]["content"]} for c in conversations]


def train_device(config: TrainConfig) -> torch.device:
    """The device the loop will train on (train/loop.py decides the same way)."""
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if config.device == "auto" else config.device)


def save_model(model, tokenizer, style: PromptStyle, path: Path) -> None:
    """The final model in Hugging Face format (a LoRA model: its adapter in PEFT format), plus the prompt
    style that generation must use."""
    if is_lora_model(model):
        save_adapter(model, tokenizer, path)
    else:
        save_pretrained(model, tokenizer, path)
    atomic_write(Path(path) / STYLE_FILE, json.dumps({"prompt_style": style.name}))


def sample_messages(sft_data: SFTData, n: int) -> list[list[dict]]:
    """The first n validation conversations, cut before their final assistant reply."""
    conversations = (getattr(sft_data, 'val_messages', None) or [])[:n]
    return [c[:-1] if c and c[-1]["role"] == "assistant" else c for c in conversations]


@torch.inference_mode()
def answer(model, tokenizer, style: PromptStyle, conversations: list[list[dict]], max_new_tokens: int) -> list[dict]:
    """Greedy answers to conversations, rendered with the run's prompt style."""
    prompts = [style.render(c, add_generation_prompt=True)[0] for c in conversations]
    config = GenerationConfig(max_new_tokens=max_new_tokens, stop_strings=list(style.stop_strings),
                              stop_ids=list(style.stop_ids))
    texts = generate_text(model, tokenizer, prompts, config)
    return [{"prompt": c[-1]["content"], "response": t} for c, t in zip(conversations, texts)]


def exact_match_rate(model, tokenizer, style: PromptStyle, records: list[dict], max_new_tokens: int) -> float:
    """Share of held-out (messages, reference) pairs whose greedy answer matches exactly."""
    conversations = [r["messages"] for r in records]
    answers = answer(model, tokenizer, style, conversations, max_new_tokens)
    return sum(exact_match(a["response"], r["reference"]) for a, r in zip(answers, records)) / len(records)
