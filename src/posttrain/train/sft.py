"""Supervised (instruction) fine-tuning: data -> batches -> the shared loop -> a run directory.

`sft(...)`'s typed signature and docstring are the `posttrain sft` command. With no arguments it runs
the offline demo: the packaged SmolLM2-135M-Instruct on posttrain's embedded instruction set, with
exact match on the held-out split measured before and after training.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
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
from posttrain.runlog import write_config
from posttrain.train.loop import TrainConfig, train
from posttrain.train.losses import sft_loss
from posttrain.train.run import check_run_dir, load_capped, resolve_run_dir, train_device
from posttrain.weights import save_pretrained
from posttrain.weights.checkpoint import atomic_write

DEMO_DATA = "demo"


@dataclass
class DataConfig:
    """Dataset, prompt style, loss masking and batching.

    Attributes:
        path: local json/jsonl/csv/parquet/txt file or folder, http(s) URL (downloaded once, cached),
            hub dataset id (owner/name[:split]), or demo (the generated offline set).
        style: prompt style: alpaca | phi3 | chatml | llama2 | template (the tokenizer's chat template)
            | plain | auto (template when the tokenizer has one, else alpaca).
        loss_on: all (prompt and response) | response (every assistant turn and its end-of-turn token).
        max_length: tokens per example (padding, concat) or per row (packed); capped at the model's context.
        batching: padding (to the longest in the batch) | packed (one stream cut into rows of max_length)
            | concat (whole examples packed best-fit-decreasing into rows of max_length).
        batch_size: rows per micro-batch (train.grad_accum micro-batches make a step).
        group_by_length: padding only: batch examples of similar length together (less padding).
        val_path: separate validation file; then path is all training data.
        test_path: separate test file.
        split: train, test, val fractions of path, taken in order (unless shuffle).
        shuffle: shuffle the records (seeded) before splitting.
        seed: seed of the split shuffle and of the batch order.
        overlong: truncate | drop examples longer than max_length (counted and reported either way);
            keep: packed batching only (cut across rows).
        skip_invalid: skip invalid records and count them by reason, instead of stopping at the first.
        mix_path: a second dataset blended into train only (e.g. pre-training text, against forgetting).
        mix_ratio: share of the training examples that come from mix_path.
        cache: cache the tokenized data on disk (keyed by data, tokenizer, style, max length, masking).
    """
    path: str = DEMO_DATA
    style: str = "alpaca"
    loss_on: str = "all"
    max_length: int = 1024
    batching: str = "padding"
    batch_size: int = 8
    group_by_length: bool = False
    val_path: str | None = None
    test_path: str | None = None
    split: tuple[float, float, float] = (0.85, 0.10, 0.05)
    shuffle: bool = False
    seed: int = 0
    overlong: str = "truncate"
    skip_invalid: bool = False
    mix_path: str | None = None
    mix_ratio: float = 0.0
    cache: bool = True


@dataclass
class SampleConfig:
    """Sample generations at each evaluation; exact match before/after training.

    Attributes:
        prompts: val prompts answered (greedy) at each evaluation, written to samples.jsonl.
        max_new_tokens: longest sample answer, in tokens.
        exact_match: exact match on the demo's held-out split before and after training (on for the demo).
    """
    prompts: int = 3
    max_new_tokens: int = 64
    exact_match: bool = False


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
    run_dir = resolve_run_dir(run_dir, runs, name, "sft", model)
    # Mistakes that need no model to find are reported before minutes of loading and tokenizing.
    check_choices(data)
    check_lora(lora, train_device(train_config.device))
    check_run_dir(run_dir, train_config.resume)
    net, tokenizer, data = load_capped(model, data)
    sft_data = prepare_sft_data(data.path, tokenizer, data.style, data.loss_on, data.max_length, data.val_path,
                                data.test_path, tuple(data.split), data.shuffle, data.seed, data.skip_invalid,
                                data.overlong, data.mix_path, data.mix_ratio, cache=data.cache)
    style = sft_data.style
    if resize_model_for_tokenizer(net, tokenizer):
        if lora.enabled:  # the new rows would stay untrained (frozen embeddings)
            raise new_tokens_error(style.name)
        print(f"added special tokens for {style.name}; embeddings resized to {net.config.vocab_size}")
    if lora.enabled:
        net = apply_lora(net, lora, base=model, device=train_device(train_config.device), seed=train_config.seed)
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


def demo_heldout() -> list[dict]:
    """The demo's held-out conversations (prompt only) with their reference answers."""
    conversations, _ = records_to_messages(load_records("demo:heldout"))
    return [{"messages": c[:-1], "reference": c[-1]["content"]} for c in conversations]


def save_model(model, tokenizer, style: PromptStyle, path: Path) -> None:
    """The final model in Hugging Face format (a LoRA model: its adapter in PEFT format), plus the prompt
    style that generation must use."""
    style_file = {STYLE_FILE: json.dumps({"prompt_style": style.name})}  # written inside the atomic folder
    if is_lora_model(model):
        save_adapter(model, tokenizer, path, extra_files=style_file)
    else:
        save_pretrained(model, tokenizer, path, extra_files=style_file)


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
