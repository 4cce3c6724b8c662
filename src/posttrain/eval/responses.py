"""`posttrain eval generate`: answer every prompt of a data split with a model, batched, and keep
the answers beside their inputs and references (JSONL) for metrics and a judge.

A run's model answers in the prompt style it was trained with (its model/posttrain.json); a bare
model uses its chat template (`--style` overrides both). Decoding is greedy by default, so the same
command gives the same file. A row stops at EOS, at the style's end-of-turn marker, or at
`max_new_tokens` (then `finish_reason` is "length": metrics count those as never stopping).

Layout of the output (default: RUN/eval/, or runs/<model name>/eval/ for a preset or hub model):

    responses-<split>.jsonl   one row per example: index, instruction, input, prompt, reference,
                              response, finish_reason, prompt_tokens, completion_tokens
    metrics-<split>.json      automatic metrics (posttrain.eval.metrics), loss and perplexity of
                              the references, the settings used and the throughput
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch.nn as nn
import yaml

from posttrain.generate import GenerationConfig, generate_batch
from posttrain.weights.checkpoint import atomic_write

SPLITS = ("train", "test", "val", "all")


@dataclass
class EvalExample:
    """One prompt to answer: its conversation up to the reply, and the reference reply."""
    index: int  # position in the split
    messages: list[dict]  # the conversation before the final assistant message
    reference: str

    def fields(self) -> dict:
        """What a responses row keeps of the input: the prompt text, and Alpaca's two fields when known."""
        user = next((m for m in reversed(self.messages) if m["role"] == "user"), self.messages[-1])
        row = {"index": self.index}
        if "instruction" in user:
            row["instruction"] = user["instruction"]
            row["input"] = user.get("input", "")
        row["prompt"] = user["content"]
        if len(self.messages) > 1:  # a system message or earlier turns: keep the whole conversation
            row["messages"] = [{"role": m["role"], "content": m["content"]} for m in self.messages]
        row["reference"] = self.reference
        return row


def load_examples(data: str, split: str = "test", fractions: Sequence[float] = (0.85, 0.10, 0.05),
                  shuffle: bool = False, seed: int = 0, limit: int | None = None) -> list[EvalExample]:
    """The examples of one split of a dataset (any format posttrain.data reads).

    split: train, test or val, cut by `fractions` (train, test, val; in order unless `shuffle`),
    as `posttrain sft` cuts them; or `all` for a file that is itself the evaluation set.
    """
    from posttrain.data.formats import records_to_messages
    from posttrain.data.sources import load_records, split_records

    if split not in SPLITS:
        raise ValueError(f"split {split!r} is unknown; choose one of {', '.join(SPLITS)}")
    records = load_records(data, split="test" if split == "all" else split)
    if split != "all":
        records = split_records(records, tuple(fractions), shuffle, seed)[split]
    if not records:
        raise ValueError(f"{data}: the {split} split is empty (fractions {tuple(fractions)})")
    if limit is not None:
        records = records[:limit]
    conversations, _ = records_to_messages(records)
    examples = []
    for i, (record, messages) in enumerate(zip(records, conversations)):
        if messages[-1]["role"] != "assistant":
            raise ValueError(f"{record.where()}: the conversation does not end with an assistant reply, so "
                             "there is no reference answer to compare with")
        examples.append(EvalExample(i, messages[:-1], messages[-1]["content"]))
    return examples


def generate_sorted(model: nn.Module, tokenizer, prompts: Sequence[Sequence[int]], config: GenerationConfig,
                    batch_size: int = 16, seeds: Sequence[int] | None = None, progress: bool = False) -> list:
    """Generations (posttrain.generate.Generation) for many prompts, in their order.

    Prompts are sorted by length before batching (less left padding, and the longest batch comes
    first, so running out of memory happens at once); inside a batch, finished rows leave the KV
    cache. With sampling, prompt i draws from seeds[i] whatever batch it lands in.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    from dataclasses import replace

    from tqdm.auto import tqdm

    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: dict[int, object] = {}
    bar = tqdm(total=len(prompts), unit="resp", disable=not progress, desc="eval generate")
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        configs = [config if seeds is None else replace(config, seed=seeds[i]) for i in batch]
        for i, g in zip(batch, generate_batch(model, tokenizer, [prompts[i] for i in batch], configs)):
            results[i] = g
        bar.update(len(batch))
    bar.close()
    return [results[i] for i in range(len(prompts))]


def generate_responses(model: nn.Module, tokenizer, style, examples: Sequence[EvalExample],
                       config: GenerationConfig, batch_size: int = 16, progress: bool = True) -> list[dict]:
    """One responses row per example, in the examples' order (batched by `generate_sorted`).

    The style's end-of-turn strings and ids stop a response, besides EOS. With sampling, example i
    draws from seed + i, so the file does not depend on batch_size.
    """
    from dataclasses import replace

    prompts = [style.render(e.messages, add_generation_prompt=True)[0] for e in examples]
    context = model.config.max_length
    for e, p in zip(examples, prompts):
        if len(p) >= context:
            raise ValueError(f"example {e.index}: its prompt has {len(p)} tokens but the model's context is "
                             f"{context}; drop it from the data or evaluate a model with a longer context")
    stop_strings = list(dict.fromkeys(config.stop_strings + list(style.stop_strings)))
    stop_ids = list(dict.fromkeys(config.stop_ids + list(style.stop_ids)))
    config = replace(config, stop_strings=stop_strings, stop_ids=stop_ids)
    seeds = None if config.seed is None else [config.seed + e.index for e in examples]
    generations = generate_sorted(model, tokenizer, prompts, config, batch_size, seeds, progress)
    return [{**e.fields(), "response": g.text, "finish_reason": g.finish_reason, "prompt_tokens": g.prompt_tokens,
             "completion_tokens": g.completion_tokens} for e, g in zip(examples, generations)]


def write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def run_config(run: str) -> dict:
    """A run directory's config.yaml (empty for a bare model)."""
    path = Path(run).expanduser() / "config.yaml"
    if path.is_file():
        return yaml.safe_load(path.read_text()) or {}
    return {}


def eval_dir(run: str) -> Path:
    """Where a model's evaluation files go: RUN/eval for a directory, else runs/<name>/eval."""
    path = Path(run).expanduser()
    if path.is_dir():
        return path / "eval"
    name = re.sub(r"[^\w.\-]+", "-", Path(str(run)).name if path.suffix == ".gguf" else str(run)).strip("-")
    return Path("runs") / name / "eval"


def choose_style(run: str, tokenizer, style: str | None, loss_on: str = "response"):
    """The prompt style to answer in: --style, else the run's saved style, else its config's, else auto."""
    from posttrain.generate import saved_style
    from posttrain.prompts import get_style

    name = style or saved_style(run) or run_config(run).get("data", {}).get("style") or "auto"
    return get_style(name, tokenizer, loss_on)


def eval_generate(run: str, data: str | None = None, split: str = "test", out: str | None = None,
                  max_new_tokens: int = 256, temperature: float = 0.0, top_p: float | None = None,
                  seed: int = 0, batch_size: int = 16, limit: int | None = None, style: str | None = None,
                  loss: bool = True, split_fractions: tuple[float, float, float] | None = None,
                  shuffle: bool | None = None, device: str | None = None, dtype: str | None = None,
                  progress: bool = True) -> dict:
    """Generate responses for a split, score them with the automatic metrics, and write both.

    Args:
        run: run directory, preset alias, hub id, local Hugging Face directory or .gguf file.
        data: dataset (file, folder, URL, hub id); default: the run's training data (config.yaml).
        split: train, test or val (cut as `posttrain sft` cuts them), or all (the whole file).
        out: responses file (default: RUN/eval/responses-SPLIT.jsonl, or runs/NAME/eval/... for a
            model that is not a directory); metrics go beside it as metrics-SPLIT.json.
        max_new_tokens: most tokens per response.
        temperature: 0 is greedy decoding (the default: the same command gives the same file).
        top_p: nucleus sampling when temperature > 0.
        seed: sampling seed (example i draws from seed + i).
        batch_size: prompts decoded together.
        limit: answer only the first N examples of the split.
        style: prompt style (alpaca, chatml, phi3, llama2, template, plain); default: the one the
            run trained with, else the model's chat template.
        loss: also compute the loss and perplexity of the reference answers.
        split_fractions: train, test, val fractions (default: the run's, else 0.85 0.10 0.05).
        shuffle: shuffle before splitting (default: as the run did, else no).
        device: cuda, cpu, ... (default: cuda when available).
        dtype: float32, bfloat16 or float16 (default: bfloat16 on CUDA, float32 on CPU).
        progress: show a progress bar.
    """
    from posttrain.eval.metrics import loss_metrics, text_metrics
    from posttrain.generate import load_for_inference

    config = run_config(run).get("data", {})
    data = data or config.get("path")
    if not data:
        raise ValueError(f"{run}: no --data given and no run config.yaml naming its data; pass --data FILE")
    fractions = tuple(split_fractions or config.get("split") or (0.85, 0.10, 0.05))
    shuffle = bool(config.get("shuffle", False)) if shuffle is None else shuffle
    examples = load_examples(data, split, fractions, shuffle, int(config.get("seed", 0)), limit)
    responses_path = Path(out) if out else eval_dir(run) / f"responses-{split}.jsonl"
    stem = responses_path.stem.replace("responses", "metrics") if "responses" in responses_path.stem \
        else responses_path.stem + "-metrics"
    metrics_path = responses_path.with_name(stem + ".json")

    model, tokenizer = load_for_inference(run, device, dtype)
    prompt_style = choose_style(run, tokenizer, style)
    gen_config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                  seed=seed if temperature > 0 else None)
    start = time.perf_counter()
    rows = generate_responses(model, tokenizer, prompt_style, examples, gen_config, batch_size, progress)
    seconds = time.perf_counter() - start
    write_jsonl(responses_path, rows)

    metrics = text_metrics(rows)
    if loss:
        full = [e.messages + [{"role": "assistant", "content": e.reference}] for e in examples]
        metrics.update(loss_metrics(model, prompt_style, full, batch_size))
    tokens = sum(r["completion_tokens"] for r in rows)
    summary = {"model": str(run), "data": str(data), "split": split, "examples": len(rows),
               "style": prompt_style.name, "generation": asdict(gen_config), "batch_size": batch_size,
               "style_stops": {"strings": list(prompt_style.stop_strings), "ids": list(prompt_style.stop_ids)},
               "metrics": metrics, "seconds": seconds, "responses_per_s": len(rows) / seconds,
               "tokens_per_s": tokens / seconds, "responses": str(responses_path)}
    atomic_write(metrics_path, json.dumps(summary, indent=2))
    print(format_metrics(metrics))
    print(f"{len(rows)} responses in {seconds:.1f} s ({summary['responses_per_s']:.2f} responses/s, "
          f"{summary['tokens_per_s']:.1f} tokens/s) -> {responses_path}; metrics -> {metrics_path}")
    return summary


def format_metrics(metrics: dict) -> str:
    return "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
