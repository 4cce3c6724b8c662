"""`posttrain eval harness`: EleutherAI's lm-evaluation-harness on a posttrain model.

The model (run, preset, hub id, .gguf) is exported to a Hugging Face directory and lm-eval's `hf`
backend (transformers) evaluates that directory, so its numbers are comparable with every other
model evaluated by the harness. lm-eval is an optional dependency: `pip install 'posttrain[eval]'`.

Offline, a task's data must already be in the Hugging Face datasets cache (run it once with a
network, or copy the cache); a task of your own (a YAML file over local JSON files) works offline
with `--include_path DIR`.

    posttrain eval harness runs/my-sft --tasks hellaswag,arc_easy --limit 500
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

from posttrain.weights.checkpoint import atomic_write

INSTALL_HINT = "pip install 'posttrain[eval]'  (or: pip install lm-eval)"


class MissingDependency(ValueError):
    """An optional package that a command needs is not installed."""


def require_lm_eval() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise MissingDependency(f"`posttrain eval harness` needs lm-evaluation-harness, which is not installed: "
                                f"{INSTALL_HINT}")


def is_hf_dir(path: Path) -> bool:
    """A directory transformers can load as it is: config.json, safetensors weights and a tokenizer."""
    return ((path / "config.json").is_file() and any(path.glob("*.safetensors"))
            and (path / "tokenizer.json").is_file())


def export_for_harness(model: str, out_dir: Path) -> Path:
    """A Hugging Face directory holding `model`: a run's model/ as it is, anything else exported."""
    path = Path(model).expanduser()
    for candidate in (path / "model", path):
        if candidate.is_dir() and is_hf_dir(candidate):
            return candidate
    from posttrain.weights import load, save_pretrained

    net, tokenizer = load(model)
    return Path(save_pretrained(net, tokenizer, out_dir / "hf-model"))


def parse_tasks(tasks: str | list[str]) -> list[str]:
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t and t.strip()]
    if not names:
        raise ValueError("--tasks is empty; name one or more lm-eval tasks, e.g. --tasks hellaswag,arc_easy")
    return names


def harness_command(model: str, tasks: str = "hellaswag", out: str | None = None, num_fewshot: int | None = None,
                    batch_size: int = 8, limit: float | None = None, device: str | None = None,
                    dtype: str | None = None, include_path: str | None = None,
                    apply_chat_template: bool = False, builtin_tasks: bool = True, seed: int = 0) -> dict:
    """Run lm-evaluation-harness tasks (HellaSwag, ARC, MMLU, ...) on a model through its hf backend.

    Args:
        model: run directory, preset alias, hub id, local Hugging Face directory or .gguf file.
        tasks: comma-separated lm-eval task names, e.g. hellaswag,arc_easy.
        out: output folder (default: RUN/eval/harness): results.json and, when needed, hf-model/
            (the exported model).
        num_fewshot: few-shot examples per prompt (default: each task's own).
        batch_size: lm-eval's batch size.
        limit: evaluate only the first N items of each task (or a fraction below 1).
        device: cuda, cpu, ... (default: cuda when available).
        dtype: float32, bfloat16 or float16 (default: bfloat16 on CUDA, float32 on CPU).
        include_path: folder of extra task YAML files (tasks of your own over local data).
        apply_chat_template: wrap prompts in the model's chat template.
        builtin_tasks: index lm-eval's own tasks too (about 15 s); false: only --include_path's.
        seed: lm-eval's random seeds.
    """
    require_lm_eval()
    from posttrain.eval.responses import eval_dir
    from posttrain.generate import default_device

    task_names = parse_tasks(tasks)
    out_dir = Path(out) if out else eval_dir(model) / "harness"
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_dir = export_for_harness(model, out_dir)
    device = device or default_device()
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")

    import lm_eval
    from lm_eval.tasks import TaskManager

    if not builtin_tasks and not include_path:
        raise ValueError("--builtin_tasks false leaves no tasks: pass --include_path DIR with your task YAML")
    task_manager = TaskManager(include_path=include_path, include_defaults=builtin_tasks)
    unknown = [t for t in task_names if t not in task_manager.all_tasks]
    if unknown:
        raise ValueError(f"lm-eval knows no task {', '.join(map(repr, unknown))}; see `lm-eval ls tasks`, or pass "
                         "--include_path DIR holding your task YAML")
    start = time.perf_counter()
    try:
        results = lm_eval.simple_evaluate(
            model="hf", model_args={"pretrained": str(hf_dir), "dtype": dtype}, tasks=task_names,
            num_fewshot=num_fewshot, batch_size=batch_size, device=device, limit=limit,
            apply_chat_template=apply_chat_template, log_samples=False, random_seed=seed,
            numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed, task_manager=task_manager)
    except (ConnectionError, OSError) as e:
        raise ValueError(f"lm-eval could not get the data of {', '.join(task_names)} ({type(e).__name__}: {e}); "
                         "offline, a task's dataset must already be in the Hugging Face datasets cache "
                         "(HF_DATASETS_CACHE): run it once with a network, or use --include_path with a task "
                         "over local files") from None
    seconds = time.perf_counter() - start
    summary = {"model": str(model), "hf_model": str(hf_dir), "tasks": task_names, "seconds": seconds,
               "results": results["results"], "versions": results.get("versions", {}),
               "n_samples": results.get("n-samples", {}), "config": results.get("config", {})}
    atomic_write(out_dir / "results.json", json.dumps(summary, indent=2, default=str))
    for task, metrics in results["results"].items():
        shown = "  ".join(f"{k.split(',')[0]} {v:.4f}" for k, v in metrics.items()
                          if isinstance(v, float) and "stderr" not in k)
        print(f"{task}: {shown}")
    print(f"lm-eval results -> {out_dir / 'results.json'}")
    return summary
