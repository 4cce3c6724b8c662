"""`posttrain report RUN [RUN ...]`: one self-contained HTML page (plots embedded as base64 PNG) and a
Markdown summary that compare runs side by side.

What a run directory may hold, and what the page shows of it (each part only when some run has it):

- config.yaml: the settings that differ between runs (all of them for a single run);
- metrics.jsonl: train and validation loss curves overlaid; final and best losses; DPO-style
  metrics as TRL names them (`rewards/margins`, `rewards/accuracies`, `rewards/chosen`,
  `logps/rejected`, ... with or without a `val_` prefix) plotted per step;
- eval/ (written by `posttrain eval ...`): automatic metrics and perplexity (metrics-SPLIT.json),
  judge scores (judge-SPLIT.json and the per-item .jsonl, as a table and overlaid histograms),
  multiple-choice accuracies (choice-TASK.json), lm-eval results (harness/results.json), and
  responses-SPLIT.jsonl, from which a few prompts are shown with every run's answer next to the
  reference (samples.jsonl's last evaluation when no run has responses);
- classification (`posttrain classify`): accuracy, macro-F1 and loss per split before and after
  training, and the confusion matrices of the test split (else the first split measured) before
  and after, from classification.json (labels from labels.json); other confusion matrices:
  `confusion_matrix` ({"labels": [...], "matrix": [[...]]}, rows = true label, columns =
  prediction) in summary.json, in the last metrics.jsonl row that has one, or in
  eval/confusion*.json.

A directory with only eval/ (e.g. runs/smollm2-135m-instruct/ for a base model evaluated with
`posttrain eval generate smollm2-135m-instruct`) is a run too: the "before" of a before/after.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from posttrain.report import _ema
from posttrain.runlog import CONFIG_FILE, METRICS_FILE, SAMPLES_FILE, read_jsonl
from posttrain.weights.checkpoint import atomic_write

DPO_PREFIXES = ("rewards/", "logps/", "logits/")
COLORS = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray"]


@dataclass
class RunData:
    """Everything the report reads from one run directory."""
    name: str
    path: Path
    config: dict = field(default_factory=dict)  # flattened: "train.lr" -> 5e-05
    metrics: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)
    generate: dict[str, dict] = field(default_factory=dict)  # split -> metrics-SPLIT.json
    judges: list[dict] = field(default_factory=list)  # judge summaries, each with "scores" added
    choices: dict[str, dict] = field(default_factory=dict)  # task -> choice result
    harness: dict[str, dict] = field(default_factory=dict)  # task -> lm-eval metrics
    responses: dict[str, dict[int, dict]] = field(default_factory=dict)  # split -> index -> row
    confusions: list[dict] = field(default_factory=list)  # {"title", "labels", "matrix"}
    classification: dict[str, dict[str, dict]] = field(default_factory=dict)  # before/after -> split -> metrics


def flatten(tree, prefix: str = "") -> dict:
    """Nested dicts -> {"a.b.c": value}; lists stay values."""
    if not isinstance(tree, dict):
        return {prefix: tree} if prefix else {}
    out = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _confusion(data, title: str) -> dict | None:
    """A confusion matrix in a few accepted shapes, normalised to {"title", "labels", "matrix"}."""
    if isinstance(data, dict) and "confusion_matrix" in data:
        data = data["confusion_matrix"]
    if isinstance(data, list):
        data = {"matrix": data}
    if not isinstance(data, dict) or not isinstance(data.get("matrix"), list) or not data["matrix"]:
        return None
    matrix = data["matrix"]
    labels = data.get("labels") or [str(i) for i in range(len(matrix))]
    if any(not isinstance(row, list) or len(row) != len(labels) for row in matrix) or len(matrix) != len(labels):
        return None
    return {"title": title, "labels": [str(x) for x in labels], "matrix": matrix}


def load_run(path: str | os.PathLike, name: str | None = None) -> RunData:
    """Read a run directory (any of its parts may be missing)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such run directory")
    run = RunData(name or path.resolve().name, path)
    if (path / CONFIG_FILE).is_file():
        config = yaml.safe_load((path / CONFIG_FILE).read_text()) or {}
        config.pop("data_report", None)  # counts of what the data held, not a setting
        run.config = flatten(config)
    run.metrics = read_jsonl(path / METRICS_FILE)
    run.samples = read_jsonl(path / SAMPLES_FILE)
    run.summary = _read_json(path / "summary.json") or {}
    for source, title in ((run.summary, "summary.json"),
                          (next((r for r in reversed(run.metrics) if "confusion_matrix" in r), None), "metrics.jsonl")):
        matrix = _confusion(source, title) if source else None
        if matrix:
            run.confusions.append(matrix)
    _load_classification(run, path)
    eval_dir = path / "eval"
    if eval_dir.is_dir():
        _load_evals(run, eval_dir)
    return run


def _load_classification(run: RunData, path: Path) -> None:
    """classification.json of a `posttrain classify` run: metrics per phase and split, and the
    confusion matrices of the test split (else the first split) before and after training."""
    results = _read_json(path / "classification.json")
    if not results:
        return
    labels = run.summary.get("labels") or (_read_json(path / "labels.json") or {}).get("labels")
    for phase in ("before", "after"):
        splits = {s: m for s, m in (results.get(phase) or {}).items() if isinstance(m, dict)}
        if not splits:
            continue
        run.classification[phase] = splits
        split = "test" if "test" in splits else next(iter(splits))
        matrix = _confusion({"labels": labels, "matrix": splits[split].get("confusion")},
                            f"{split} split, {phase} training")
        if matrix:
            run.confusions.append(matrix)


def _load_evals(run: RunData, eval_dir: Path) -> None:
    for file in sorted(eval_dir.glob("*.json")):
        data = _read_json(file)
        if data is None:
            continue
        if file.stem.startswith("confusion"):
            matrix = _confusion(data, file.name)
            if matrix:
                run.confusions.append(matrix)
        elif "prompt_id" in data and "judge" in data:  # a judge summary
            scores_file = file.with_suffix(".jsonl")
            scores = [r["score"] for r in read_jsonl(scores_file) if isinstance(r.get("score"), (int, float))]
            run.judges.append({**data, "scores": scores, "file": file.stem})
        elif "acc" in data and "task" in data:
            run.choices[str(data["task"])] = data
        elif isinstance(data.get("metrics"), dict) and "split" in data:
            run.generate[str(data["split"])] = data
    harness = _read_json(eval_dir / "harness" / "results.json")
    if harness and isinstance(harness.get("results"), dict):
        run.harness = harness["results"]
    for file in sorted(eval_dir.glob("responses*.jsonl")):
        split = file.stem.split("-", 1)[1] if "-" in file.stem else file.stem
        rows = read_jsonl(file)
        run.responses[split] = {int(r.get("index", i)): r for i, r in enumerate(rows)}


def unique_names(paths: Sequence[Path]) -> list[str]:
    """Run names from directory names, with parents added until they differ."""
    parts = [Path(p).resolve().parts for p in paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]


# -- tables --------------------------------------------------------------------------------------

def _fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.3e}"
        return f"{value:.4f}".rstrip("0").rstrip(".") if abs(value) < 1000 else f"{value:.1f}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def config_rows(runs: Sequence[RunData]) -> list[list]:
    """[key, value per run] for config keys whose values differ between the runs that have them
    (a key a run lacks, e.g. a base model evaluated without training, is no difference); every key
    when a single run has a config."""
    keys = sorted({k for r in runs for k in r.config})
    with_config = sum(1 for r in runs if r.config)
    rows = []
    for key in keys:
        values = [r.config.get(key) for r in runs]
        present = {json.dumps(r.config[key], sort_keys=True, default=str) for r in runs if key in r.config}
        if with_config == 1 or len(present) > 1:
            rows.append([key, *values])
    return rows


def _last(rows: list[dict], key: str):
    return next((r[key] for r in reversed(rows) if isinstance(r.get(key), (int, float))), None)


def metric_rows(runs: Sequence[RunData]) -> list[list]:
    """[metric name, value per run] for training, automatic metrics, judge, choice and harness results."""
    table: dict[str, list] = {}

    def put(name: str, i: int, value) -> None:
        table.setdefault(name, [None] * len(runs))[i] = value

    for i, run in enumerate(runs):
        m = run.metrics
        if m:
            put("train: steps", i, _last(m, "step"))
            put("train: tokens seen", i, _last(m, "tokens_seen"))
            put("train: final loss", i, _last(m, "loss"))
            put("train: final val loss", i, _last(m, "val_loss"))
            vals = [r["val_loss"] for r in m if isinstance(r.get("val_loss"), (int, float))]
            put("train: best val loss", i, min(vals) if vals else None)
            for key in sorted({k for r in m for k in r if _is_dpo(k)}):
                put(f"train: {key} (last)", i, _last(m, key))
        for split, data in sorted(run.generate.items()):
            for key, value in data["metrics"].items():
                if key not in ("n",):
                    put(f"{split}: {key}", i, value)
            put(f"{split}: responses/s", i, data.get("responses_per_s"))
            put(f"{split}: examples", i, data.get("examples"))
        for judge in run.judges:
            label = f"judge {Path(str(judge.get('prompt'))).name} by {judge.get('judge')} ({judge['file']})"
            mean, stderr = judge.get("mean"), judge.get("stderr")
            put(f"{label}: mean ± stderr", i, None if mean is None else
                f"{mean:.2f} ± {stderr:.2f}" if stderr is not None else f"{mean:.2f}")
            put(f"{label}: median", i, judge.get("median"))
            put(f"{label}: scored / unparseable", i, f"{judge.get('scored')} / {judge.get('unparseable')}")
            if judge.get("failed"):  # items the judge refused (e.g. over its context)
                put(f"{label}: failed", i, judge["failed"])
        for phase in ("before", "after"):
            for split, data in sorted(run.classification.get(phase, {}).items()):
                for key in ("accuracy", "macro_f1", "loss"):
                    put(f"classify {split}: {key} ({phase})", i, data.get(key))
        for task, data in sorted(run.choices.items()):
            put(f"choice {task}: acc", i, data.get("acc"))
            put(f"choice {task}: acc_norm", i, data.get("acc_norm"))
        for task, metrics in sorted(run.harness.items()):
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and "stderr" not in key:
                    put(f"lm-eval {task}: {key.split(',')[0]}", i, value)
    def rank(name: str) -> int:  # training first, then automatic metrics, classification, judges, benchmarks
        return next((i for i, p in enumerate(("train:", "", "classify ", "judge ", "choice ", "lm-eval ")) if p and
                     name.startswith(p)), 1)

    return [[name, *values] for name, values in sorted(table.items(), key=lambda kv: rank(kv[0]))]


def _is_dpo(key: str) -> bool:
    return key.removeprefix("val_").startswith(DPO_PREFIXES)


def sample_rows(runs: Sequence[RunData], n: int) -> tuple[str, list[dict]]:
    """(where from, [{"prompt", "reference", "answers": [per run]}]) for n prompts.

    From the responses files: the split most runs have, and the first indices present in all of
    them. Else from samples.jsonl (the last evaluation step of each run).
    """
    splits = sorted({s for r in runs for s in r.responses}, key=lambda s: (-sum(s in r.responses for r in runs), s))
    if splits:
        split = "test" if "test" in splits and sum("test" in r.responses for r in runs) == \
            sum(splits[0] in r.responses for r in runs) else splits[0]
        having = [r.responses[split] for r in runs if split in r.responses]
        common = sorted(set.intersection(*(set(h) for h in having)))[:n]
        out = []
        for index in common:
            first = next(h[index] for h in having)
            out.append({"prompt": first.get("prompt") or first.get("instruction", ""), "reference": first.get("reference"),
                        "answers": [r.responses.get(split, {}).get(index, {}).get("response") for r in runs]})
        return f"responses-{split}.jsonl", out
    last = []
    for run in runs:
        step = max((s.get("step", 0) for s in run.samples), default=None)
        last.append({s.get("prompt"): s.get("response") for s in run.samples if s.get("step") == step})
    prompts = list(dict.fromkeys(p for rows in last for p in rows))[:n]
    return "samples.jsonl (last evaluation)", [{"prompt": p, "reference": None,
                                                 "answers": [rows.get(p) for rows in last]} for p in prompts]


# -- plots ---------------------------------------------------------------------------------------

def _png(fig) -> str:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode()


def _series(rows: list[dict], x: str, y: str) -> tuple[list, list]:
    pts = [(r[x], r[y]) for r in rows if isinstance(r.get(x), (int, float)) and isinstance(r.get(y), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def loss_plot(runs: Sequence[RunData], x: str = "step", xlabel: str = "optimizer step") -> str | None:
    """Train loss (EMA over a faint raw curve) and validation loss of every run, overlaid."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100)
    ax = fig.add_subplot()
    drawn = False
    for run, color in zip(runs, COLORS * 4):
        tx, ty = _series(run.metrics, x, "loss")
        if tx:
            ax.plot(tx, ty, color=color, alpha=0.2, linewidth=0.8)
            ax.plot(tx, _ema(ty), color=color, label=f"{run.name} train (EMA)")
        vx, vy = _series(run.metrics, x, "val_loss")
        if vx:
            ax.plot(vx, vy, "o--", color=color, label=f"{run.name} val")
        drawn = drawn or bool(tx or vx)
    if not drawn:
        return None
    ax.set_xlabel(xlabel)
    ax.set_ylabel("loss")
    ax.set_title(f"loss vs {xlabel}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def dpo_plots(runs: Sequence[RunData]) -> list[tuple[str, str]]:
    """(metric name, PNG) for each TRL-style preference metric some run logged."""
    from matplotlib.figure import Figure

    keys = sorted({k for r in runs for row in r.metrics for k in row if _is_dpo(k) and not k.startswith("val_")})
    keys += sorted({k for r in runs for row in r.metrics for k in row if k.startswith("val_") and _is_dpo(k)})
    order = {"rewards/margins": 0, "rewards/accuracies": 1}
    keys.sort(key=lambda k: (order.get(k.removeprefix("val_"), 2), k))
    plots = []
    for key in keys:
        fig = Figure(figsize=(8, 3.6), dpi=100)
        ax = fig.add_subplot()
        for run, color in zip(runs, COLORS * 4):
            xs, ys = _series(run.metrics, "step", key)
            if xs:
                style = "o--" if key.startswith("val_") else "-"
                ax.plot(xs, ys if key.startswith("val_") else _ema(ys), style, color=color, label=run.name)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(key)
        ax.set_title(key + ("" if key.startswith("val_") else " (EMA)"))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        plots.append((key, _png(fig)))
    return plots


def judge_plots(runs: Sequence[RunData]) -> list[tuple[str, str]]:
    """Overlaid score histograms, one per (prompt, judge, file) that runs share."""
    from posttrain.eval.judge import histogram_png

    groups: dict[tuple, dict[str, list]] = {}
    scales: dict[tuple, tuple[int, int]] = {}
    for run in runs:
        for judge in run.judges:
            key = (Path(str(judge.get("prompt"))).name, judge.get("judge"), judge["file"])
            groups.setdefault(key, {})[run.name] = judge["scores"]
            scales[key] = tuple(judge.get("scale") or (0, 100))
    out = []
    for key, scores in groups.items():
        title = f"judge {key[0]} by {key[1]} ({key[2]})"
        png = histogram_png(scores, scales[key][0], scales[key][1], title)
        out.append((title, base64.b64encode(png).decode()))
    return out


def confusion_plot(matrix: dict, title: str) -> str:
    from matplotlib.figure import Figure

    labels, values = matrix["labels"], matrix["matrix"]
    size = max(3.5, 0.6 * len(labels) + 2)
    fig = Figure(figsize=(size, size * 0.85), dpi=100)
    ax = fig.add_subplot()
    image = ax.imshow(values, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    top = max((v for row in values for v in row), default=0)
    for r, row in enumerate(values):
        for c, v in enumerate(row):
            ax.text(c, r, _fmt(v), ha="center", va="center", fontsize=8, color="white" if v > top / 2 else "black")
    return _png(fig)


# -- output --------------------------------------------------------------------------------------

CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, Roboto, sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; text-align: left; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.text { white-space: pre-wrap; max-width: 420px; font-size: 0.9em; }
img { max-width: 100%; border: 1px solid #eee; margin: .5em 0; }
.muted { color: #777; font-size: 0.9em; }
"""


def _cell(value) -> str:
    cls = "num" if isinstance(value, (int, float)) and not isinstance(value, bool) else ""
    return f'<td class="{cls}">{html.escape(_fmt(value))}</td>' if cls else f"<td>{html.escape(_fmt(value))}</td>"


def _html_table(header: Sequence[str], rows: Sequence[Sequence], table_id: str) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr><th>" + html.escape(str(r[0])) + "</th>" + "".join(_cell(v) for v in r[1:]) + "</tr>"
                   for r in rows)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _img(b64: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def _md_escape(value) -> str:
    return _fmt(value).replace("|", "\\|").replace("\n", " ")


def _md_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(_md_escape(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md_escape(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _short(text, limit: int = 300) -> str:
    text = "" if text is None else str(text)
    return text if len(text) <= limit else text[:limit] + " …"


def build_report(runs: Sequence[RunData], samples: int = 5) -> tuple[str, str]:
    """(HTML page, Markdown summary) comparing `runs`."""
    names = [r.name for r in runs]
    header = ["", *names]
    title = "posttrain report: " + " vs ".join(names)
    html_parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                  f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    md = [f"# {title}", ""]
    run_rows = [[r.name, str(r.path), r.config.get("task", "eval only" if not r.metrics else None),
                 r.config.get("model") or next((g.get("model") for g in r.generate.values()), None)] for r in runs]
    html_parts.append("<h2>Runs</h2>" + _html_table(["run", "directory", "task", "model"], run_rows, "runs"))
    md += ["## Runs", "", _md_table(["run", "directory", "task", "model"], run_rows), ""]

    configs = config_rows(runs)
    if configs:
        what = "Config" if len(runs) == 1 else "Configs that differ"
        html_parts.append(f"<h2>{what}</h2>" + _html_table(["key", *names], configs, "config-diff"))
        md += [f"## {what}", "", _md_table(["key", *names], configs), ""]
    elif len(runs) > 1 and any(r.config for r in runs):
        html_parts.append("<h2>Configs that differ</h2><p class='muted'>none: the configs are identical</p>")
    for r in runs:  # every setting, folded away
        if r.config and (len(runs) > 1):
            rows = [[k, v] for k, v in sorted(r.config.items())]
            html_parts.append(f"<details><summary>full config of {html.escape(r.name)}</summary>"
                              + _html_table(["key", r.name], rows, f"config-{r.name}") + "</details>")

    metrics = metric_rows(runs)
    if metrics:
        html_parts.append("<h2>Final metrics</h2>" + _html_table(header, metrics, "metrics"))
        md += ["## Final metrics", "", _md_table(["metric", *names], metrics), ""]

    plots = [("loss vs step", loss_plot(runs))]
    if any(_series(r.metrics, "tokens_seen", "loss")[0] for r in runs):
        plots.append(("loss vs tokens seen", loss_plot(runs, "tokens_seen", "tokens seen")))
    plots = [(t, p) for t, p in plots if p]
    if plots:
        html_parts.append("<h2>Loss curves</h2>" + "".join(_img(p, t) for t, p in plots))
    dpo = dpo_plots(runs)
    if dpo:
        html_parts.append("<h2>Preference metrics (DPO)</h2>" + "".join(_img(p, t) for t, p in dpo))
    judges = judge_plots(runs)
    if judges:
        html_parts.append("<h2>Judge scores</h2>" + "".join(_img(p, t) for t, p in judges))
    confusions = [(r.name, m) for r in runs for m in r.confusions]
    if confusions:
        html_parts.append("<h2>Confusion matrices</h2>")
        md += ["## Confusion matrices", ""]
        for name, m in confusions:
            rows = [[f"true {label}", *row] for label, row in zip(m["labels"], m["matrix"])]
            cm_header = ["", *[f"pred {label}" for label in m["labels"]]]
            html_parts.append(f"<h3>{html.escape(name)} ({html.escape(m['title'])})</h3>"
                              + _img(confusion_plot(m, f"{name}: {m['title']}"), f"confusion matrix {name}")
                              + _html_table(cm_header, rows, f"confusion-{len(html_parts)}"))
            md += [f"### {name} ({m['title']})", "", _md_table(cm_header, rows), ""]

    source, examples = sample_rows(runs, samples)
    if examples:
        html_parts.append(f"<h2>Sample answers</h2><p class='muted'>from {html.escape(source)}</p>")
        head = "".join(f"<th>{html.escape(h)}</th>" for h in ["prompt", "reference", *names])
        body = "".join("<tr>" + "".join(f'<td class="text">{html.escape(_fmt(v) if v is not None else "—")}</td>'
                                        for v in [e["prompt"], e["reference"], *e["answers"]]) + "</tr>"
                       for e in examples)
        html_parts.append(f'<table id="samples"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>')
        md += ["## Sample answers", "", f"from {source}", ""]
        for k, e in enumerate(examples, 1):
            md += [f"**{k}. {_md_escape(_short(e['prompt'], 500))}**", ""]
            if e["reference"] is not None:
                md.append(f"- reference: {_md_escape(_short(e['reference']))}")
            md += [f"- {name}: {_md_escape(_short(a))}" for name, a in zip(names, e["answers"])] + [""]
    html_parts.append("</body></html>")
    return "".join(html_parts), "\n".join(md)


def default_report_path(paths: Sequence[Path]) -> Path:
    if len(paths) == 1:
        return Path(paths[0]) / "report.html"
    parent = Path(os.path.commonpath([str(Path(p).resolve()) for p in paths]))
    stem = "-vs-".join(Path(p).resolve().name for p in paths)[:120]
    return parent / f"report-{stem}.html"


def report_command(runs: list[str], out: str | None = None, samples: int = 5) -> Path:
    """Compare runs in one self-contained HTML page (plots embedded) and a Markdown summary beside it.

    Args:
        runs: run directories, e.g. '[runs/base, runs/sft]' (a single run needs no brackets when the
            CLI passes positional lists through; see posttrain.cli).
        out: HTML file (default: RUN/report.html for one run, else report-A-vs-B.html in the runs'
            common folder); the Markdown summary is written beside it (.md).
        samples: prompts shown with every run's answer.
    """
    if isinstance(runs, (str, os.PathLike)):
        runs = [runs]
    if not runs:
        raise ValueError("name at least one run directory")
    paths = [Path(r).expanduser() for r in runs]
    for p in paths:
        if not p.is_dir():
            raise FileNotFoundError(f"{p}: no such run directory")
    data = [load_run(p, name) for p, name in zip(paths, unique_names(paths))]
    page, summary = build_report(data, samples)
    out_path = Path(out) if out else default_report_path(paths)
    atomic_write(out_path, page)
    atomic_write(out_path.with_suffix(".md"), summary + "\n")
    print(f"report -> {out_path} ({len(page) / 1e3:.0f} kB), summary -> {out_path.with_suffix('.md')}")
    return out_path


def report_argv(argv: list[str]) -> list[str]:
    """`report A B --out X` -> `report '["A", "B"]' --out X`: jsonargparse reads a list-typed positional
    only as one JSON/YAML list, so the CLI gathers the run directories into one before parsing."""
    if argv[:1] != ["report"] or any(a in ("-h", "--help") for a in argv):
        return argv
    positional, options, i = [], [], 1
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--"):
            options.append(arg)
            if "=" not in arg and arg not in ("--print_config",) and i + 1 < len(argv):
                options.append(argv[i + 1])
                i += 1
        else:
            positional.append(arg)
        i += 1
    if len(positional) == 1 and positional[0].lstrip().startswith("["):
        return argv  # already a list
    return ["report", json.dumps(positional), *options] if positional else argv
