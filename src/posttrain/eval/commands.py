"""The `posttrain eval ...` subcommands: each a plain function whose signature and docstring are its
options (see posttrain.cli).

    posttrain eval generate RUN --data FILE --split test   responses + automatic metrics + perplexity
    posttrain eval metrics RESPONSES                       text metrics of a responses file, no model
    posttrain eval loss RUN --data FILE --split test       loss and perplexity of the references
    posttrain eval judge RESPONSES --endpoint URL --model NAME   LLM-as-judge scores
    posttrain eval choice RUN --data FILE_OR_HUB_ID        multiple-choice log-likelihood accuracy
    posttrain eval harness RUN --tasks hellaswag           lm-evaluation-harness on the exported model
"""

from __future__ import annotations

import json
from pathlib import Path

from posttrain.weights.checkpoint import atomic_write


def metrics_command(responses: str, out: str | None = None) -> dict:
    """Automatic text metrics of a responses file (exact match, contains, ROUGE-L, lengths, no-stop rate).

    Args:
        responses: responses JSONL (from `posttrain eval generate`, or any file whose rows hold
            `response` and `reference`).
        out: metrics JSON (default: beside the responses, responses-X.jsonl -> text-metrics-X.json).
    """
    from posttrain.eval.metrics import read_responses, text_metrics
    from posttrain.eval.responses import format_metrics

    path = Path(responses)
    metrics = text_metrics(read_responses(path))
    stem = path.stem.replace("responses", "text-metrics") if "responses" in path.stem else path.stem + "-text-metrics"
    out_path = Path(out) if out else path.with_name(stem + ".json")
    atomic_write(out_path, json.dumps({"responses": str(path), "metrics": metrics}, indent=2))
    print(format_metrics(metrics))
    print(f"-> {out_path}")
    return metrics


def loss_command(run: str, data: str | None = None, split: str = "test", batch_size: int = 8,
                 limit: int | None = None, style: str | None = None, loss_on: str = "response",
                 device: str | None = None, dtype: str | None = None) -> dict:
    """Loss and perplexity of a split's reference answers under a model (no generation).

    Args:
        run: run directory, preset alias, hub id, local Hugging Face directory or .gguf file.
        data: dataset; default: the run's training data (config.yaml).
        split: train, test or val (cut as `posttrain sft` cuts them), or all.
        batch_size: examples per forward pass.
        limit: only the first N examples.
        style: prompt style (default: the run's, else the model's chat template).
        loss_on: response (the answers and their end-of-turn) or all (every token).
        device: cuda, cpu, ... (default: cuda when available).
        dtype: float32, bfloat16 or float16 (default: float32 on CPU).
    """
    from posttrain.eval.metrics import loss_metrics
    from posttrain.eval.responses import choose_style, load_examples, run_config
    from posttrain.generate import load_for_inference

    config = run_config(run).get("data", {})
    data = data or config.get("path")
    if not data:
        raise ValueError(f"{run}: no --data given and no run config.yaml naming its data; pass --data FILE")
    examples = load_examples(data, split, tuple(config.get("split") or (0.85, 0.10, 0.05)),
                             bool(config.get("shuffle", False)), int(config.get("seed", 0)), limit)
    model, tokenizer = load_for_inference(run, device, dtype)
    prompt_style = choose_style(run, tokenizer, style, loss_on)
    full = [e.messages + [{"role": "assistant", "content": e.reference}] for e in examples]
    result = loss_metrics(model, prompt_style, full, batch_size)
    print(f"{split}: loss {result['loss']:.4f}  perplexity {result['perplexity']:.3f}  over {result['loss_tokens']} "
          f"tokens of {result['loss_examples']} examples")
    return result


def eval_commands() -> dict:
    """Subcommands of `posttrain eval`, for posttrain.cli.commands()."""
    from posttrain.eval.choice import choice_command
    from posttrain.eval.harness import harness_command
    from posttrain.eval.judge import judge_command
    from posttrain.eval.responses import eval_generate

    return {"generate": eval_generate, "judge": judge_command, "metrics": metrics_command, "loss": loss_command,
            "choice": choice_command, "harness": harness_command}
