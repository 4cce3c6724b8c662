"""LLM-as-judge: a larger model scores each response against its reference, over any
OpenAI-compatible chat endpoint (posttrain serve, Ollama, LM Studio, vLLM, OpenAI).

    posttrain eval judge runs/my-sft/eval/responses-test.jsonl --endpoint http://127.0.0.1:11434/v1 \\
        --model llama3.1:8b

Prompts (`--prompt`): `seed` (the default, a 0-100 score: the seed projects' prompt exactly as
rasbt's LLMs-from-scratch ch. 7 writes it, "Given the input `{formatted_input}` and correct output
`{output}`, score the model response `{response}` on a scale from 0 to 100, where 100 is the best
score. Respond with the integer number only.", the input shown in the Alpaca template), `rubric`
(1-5 with a description of each level), or a text file with placeholders (`--scale LO,HI` then
says the range). Placeholders: {prompt} (the user's request), {instruction} and {input} (Alpaca's
fields), {formatted_input} (the request in the Alpaca template, as the seed shows it), {output} or
{reference} (the reference answer), {response} (the answer being judged). Other braces are left
as they are, so a prompt may hold JSON.

Requests go out at temperature 0 with a fixed seed (dropped when a server rejects it), at most
`concurrency` at a time. Transport errors, 429 and 5xx are retried with backoff; an answer that is
not a score in range is asked again (the bad answer and a reminder of the format are sent back)
up to `retries` times, then saved with score null and counted as unparseable: a score is never
guessed. A request the server refuses for that item alone (400, 413 or 422: above all a prompt
longer than the judge's context) is saved with status "failed" and the server's reason, and the
run goes on; the next run of the same command asks for the failed items again (a different
judge, a longer context, a fixed bug), the rest stays. Errors that concern every request (server
down, wrong model or key, malformed replies) stop the run, as does a run in which nothing was
answered and every request was refused. Every judged item is appended to the output JSONL as soon
as it is known, so an interrupted run loses nothing: the same command continues where it
stopped, without duplicates. At the end: mean, median, standard error (over the scored items), a
histogram (PNG) and the summary (JSON, with the counts of scored, unparseable and failed items).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import statistics
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import httpx

from posttrain.synth.endpoint import ChatEndpoint, EndpointError, normalize_base_url
from posttrain.weights.checkpoint import atomic_write

SEED_PROMPT = (
    "Given the input `{formatted_input}` "
    "and correct output `{output}`, "
    "score the model response `{response}`"
    " on a scale from 0 to 100, where 100 is the best score. "
    "Respond with the integer number only."
)

RUBRIC_PROMPT = """You are grading an AI assistant's answer to a request, using a reference answer.

Request:
{prompt}

Reference answer:
{reference}

Assistant's answer:
{response}

Rate the assistant's answer on this scale:
5 = correct and complete; as good as the reference
4 = correct, with small omissions, mistakes or unneeded text
3 = partly correct
2 = mostly wrong, but with something relevant
1 = wrong, irrelevant or empty

Respond with the single digit only."""

PROMPTS = {"seed": (SEED_PROMPT, (0, 100)), "rubric": (RUBRIC_PROMPT, (1, 5))}
# Answers that refuse one item, not the whole run: a bad request (above all a prompt over the judge's
# context: OpenAI, vLLM, llama.cpp and posttrain serve answer 400), a body too large, a rejected value.
# 401/403 (key), 404 (model, URL), 429 and 5xx (after their retries) concern every request and stop the run.
ITEM_ERROR_STATUS = (400, 413, 422)
PLACEHOLDERS = ("prompt", "instruction", "input", "formatted_input", "output", "reference", "response")
ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.")


# -- the client ----------------------------------------------------------------------------------
# Requests go through posttrain.synth.endpoint.ChatEndpoint (timeouts, retries of connection errors,
# 429 and 5xx with backoff, the key from an environment variable). The judge adds a check before
# any work (the server answers and serves the model) and drops the seed when a server refuses it.

def _error_message(response: httpx.Response) -> str:
    """The message of an OpenAI-shaped error body, else the start of the body."""
    try:
        error = response.json().get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
    except (ValueError, AttributeError):
        pass
    return response.text[:300]


def chat_url(base_url: str) -> str:
    """The API root for a URL given as http://host:port, .../v1 or .../v1/chat/completions."""
    url = base_url.strip().rstrip("/")
    if url.endswith("/chat/completions"):
        url = url[: -len("/chat/completions")]
    return normalize_base_url(url)


class JudgeClient:
    """A chat endpoint as the judge uses it. Thread-safe: worker threads share one instance."""

    def __init__(self, base_url: str, model: str | None, api_key_env: str | None = None, timeout: float = 120.0,
                 retries: int = 3, backoff: float = 0.5):
        self.endpoint = ChatEndpoint(chat_url(base_url), model or "", api_key_env, timeout=timeout,
                                     max_retries=retries, backoff=backoff)
        self.base_url = self.endpoint.base_url
        self.send_seed = True  # cleared when the server refuses the parameter

    @property
    def model(self) -> str:
        return self.endpoint.model

    def _down(self, error: Exception) -> EndpointError:
        return EndpointError(f"cannot reach {self.base_url} ({type(error).__name__}: {error or 'no answer'}); "
                             "is the server running and is the URL right? (e.g. `posttrain serve MODEL --port "
                             "8000` -> http://127.0.0.1:8000/v1, Ollama -> http://127.0.0.1:11434/v1)")

    def models(self) -> list[str] | None:
        """The model ids the server lists at /models; None when it has no such list."""
        try:
            response = httpx.get(self.base_url + "/models", headers=self.endpoint.headers,
                                 timeout=min(self.endpoint.timeout, 30.0))
        except httpx.TransportError as e:
            raise self._down(e) from None
        if response.status_code in (401, 403):
            raise EndpointError(f"{self.base_url}: the API key was refused ({response.status_code}: "
                                f"{_error_message(response)}); pass --api_key_env NAME_OF_THE_VARIABLE",
                                response.status_code)
        try:
            data = response.json().get("data") if response.status_code == 200 else None
            return [str(m["id"]) for m in data] if isinstance(data, list) else None
        except (ValueError, AttributeError, KeyError, TypeError):
            return None

    def check(self) -> None:
        """Fail early, before any work: the server answers, and serves the model when it lists models."""
        listed = self.models()
        if listed and self.model not in listed:
            shown = ", ".join(listed[:20]) + (" ..." if len(listed) > 20 else "")
            raise EndpointError(f"model {self.model!r} is not served by {self.base_url}; it serves: {shown}", 404)

    def only_model(self) -> str:
        """The model a server lists when it lists exactly one (posttrain serve, a one-model vLLM)."""
        listed = self.models() or []
        if len(listed) != 1:
            shown = f"; it serves: {', '.join(listed[:20])}" if listed else ""
            raise EndpointError(f"pass --model: {self.base_url} does not name a single model{shown}")
        self.endpoint.model = listed[0]
        return listed[0]

    def chat(self, messages: list[dict], max_tokens: int | None, seed: int | None) -> str:
        """The reply's text at temperature 0, with `seed` unless the server refused seeds before."""
        try:
            return self.endpoint.chat(messages, 0.0, seed if self.send_seed else None, max_tokens).text
        except EndpointError as e:
            if e.status in (400, 422) and seed is not None and self.send_seed and "seed" in str(e).lower():
                self.send_seed = False  # "a fixed seed where the server accepts one"
                return self.endpoint.chat(messages, 0.0, None, max_tokens).text
            raise


# -- prompts and scores --------------------------------------------------------------------------

@dataclass
class JudgePrompt:
    """A judging prompt template and the range of scores it asks for."""
    name: str
    template: str
    low: int
    high: int

    @property
    def fingerprint(self) -> str:
        """Identifies the prompt and scale: a resumed run must not mix scores of two prompts."""
        return hashlib.sha256(f"{self.low},{self.high}\n{self.template}".encode()).hexdigest()[:16]

    def render(self, row: dict) -> str:
        values = judge_fields(row)

        def value(match: re.Match) -> str:
            text = values[match.group(1)]
            if text is None:
                raise ValueError(f"the judge prompt uses {{{match.group(1)}}} but the row has no 'prompt', "
                                 "'instruction' or 'messages'; write responses with `posttrain eval generate`, or "
                                 "use a prompt file with only {reference} and {response}")
            return text

        return re.sub(r"\{(" + "|".join(PLACEHOLDERS) + r")\}", value, self.template)

    def reminder(self) -> str:
        return f"Reply with one integer from {self.low} to {self.high} only."


def load_prompt(prompt: str = "seed", scale: tuple[int, int] | None = None) -> JudgePrompt:
    """`seed`, `rubric`, or a prompt template file (its scale from `scale`, default 0-100)."""
    if prompt in PROMPTS:
        template, default_scale = PROMPTS[prompt]
        low, high = scale or default_scale
        return JudgePrompt(prompt, template, int(low), int(high))
    path = Path(prompt).expanduser()
    if not path.is_file():
        raise ValueError(f"--prompt {prompt!r}: not one of {', '.join(PROMPTS)} and not a file")
    template = path.read_text()
    if "{response}" not in template:
        raise ValueError(f"{path}: the prompt has no {{response}} placeholder, so the judge would never see the "
                         f"answer; placeholders: {', '.join('{' + p + '}' for p in PLACEHOLDERS)}")
    low, high = scale or (0, 100)
    if int(low) >= int(high):
        raise ValueError(f"--scale {low},{high}: the lowest score must be below the highest")
    return JudgePrompt(str(path), template, int(low), int(high))


def judge_fields(row: dict) -> dict[str, str | None]:
    """Placeholder values for one responses row (None: the row has no request to show)."""
    prompt = row.get("prompt")
    instruction = row.get("instruction")
    if prompt is None and instruction is not None:
        prompt = instruction if not row.get("input") else f"{instruction}\n\n{row['input']}"
    if prompt is None and isinstance(row.get("messages"), list):  # a conversation: its last user turn
        prompt = next((m.get("content") for m in reversed(row["messages"])
                       if isinstance(m, dict) and m.get("role") == "user"), None)
    instruction = prompt if instruction is None else instruction
    input_text = row.get("input") or ""
    formatted = None
    if instruction is not None:
        formatted = f"{ALPACA_PREAMBLE}\n\n### Instruction:\n{instruction}"
        if input_text:
            formatted += f"\n\n### Input:\n{input_text}"
    return {"prompt": prompt, "instruction": instruction, "input": input_text, "formatted_input": formatted,
            "output": row["reference"], "reference": row["reference"], "response": row["response"]}


_SCORE = re.compile(r"^(?:(?:final\s+)?(?:score|rating|grade)\s*(?:is)?\s*[:=]?\s*)?(-?\d+)"
                    r"\s*(?:(?:/|out\s+of)\s*(\d+))?\s*\.?$", re.IGNORECASE)


def parse_score(text: str, low: int, high: int) -> int | None:
    """The score in a judge's answer, or None when the answer is not one integer in [low, high].

    Accepted: "85", " 85.", "**85**", "Score: 85", "85/100", "4 out of 5" (the denominator must be
    the scale's top). Anything else (words, two numbers, a decimal, out of range) is None: a
    score is never guessed from prose.
    """
    cleaned = text.strip().strip("*_`\"' \n").strip()
    match = _SCORE.match(cleaned)
    if not match:
        return None
    value = int(match.group(1))
    if match.group(2) is not None and int(match.group(2)) != high:
        return None
    return value if low <= value <= high else None


# -- judging -------------------------------------------------------------------------------------

def judge_one(client: JudgeClient, prompt: JudgePrompt, row: dict, retries: int = 2, seed: int | None = 0,
              max_tokens: int | None = 32) -> dict:
    """Score one responses row: ask, and on an unparseable answer ask again (up to `retries` times).

    A request the server refuses for this item (ITEM_ERROR_STATUS, e.g. a prompt over the judge's
    context) gives status "failed" with the server's reason; other endpoint errors propagate.
    """
    messages = [{"role": "user", "content": prompt.render(row)}]
    answers = []
    for _ in range(retries + 1):
        try:
            answer = client.chat(messages, max_tokens, seed)
        except EndpointError as e:
            if e.status not in ITEM_ERROR_STATUS:
                raise
            return {"score": None, "status": "failed", "attempts": len(answers) + 1, "answers": answers,
                    "error": str(e), "http_status": e.status}
        answers.append(answer)
        score = parse_score(answer, prompt.low, prompt.high)
        if score is not None:
            return {"score": score, "status": "ok", "attempts": len(answers), "answers": answers}
        messages = messages + [{"role": "assistant", "content": answer}, {"role": "user", "content": prompt.reminder()}]
    return {"score": None, "status": "unparseable", "attempts": len(answers), "answers": answers}


def read_judged(path: Path, judge_model: str | None, prompt: JudgePrompt) -> dict[int, dict]:
    """Rows already judged in `path` (by index; failed ones included). A torn last line (a killed run)
    is dropped and the file rewritten without it; rows from another judge or prompt are an error,
    not mixed in."""
    if not path.is_file():
        return {}
    done: dict[int, dict] = {}
    lines = path.read_text().splitlines()
    torn = False
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if line_no == len(lines):
                torn = True  # the writer died mid-line: that item is judged again
                continue
            raise ValueError(f"{path}:{line_no}: not valid JSON; fix or delete that line, then run again") from None
        if (judge_model is not None and row.get("judge") != judge_model) or row.get("prompt_id") != prompt.fingerprint:
            raise ValueError(f"{path} holds scores from judge {row.get('judge')!r} with prompt id "
                             f"{row.get('prompt_id')!r}, not {judge_model!r} / {prompt.fingerprint!r}; choose "
                             "another --out, or delete that file to start over")
        done.setdefault(int(row["index"]), row)
    if torn:
        atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in done.values()))
    return done


def drop_failed(path: Path, judged: dict[int, dict], indices: set[int]) -> dict[int, dict]:
    """`judged` without the failed rows of `indices`, rewriting `path` without them (atomically), so
    that judging those items again appends each one once."""
    again = {i for i, r in judged.items() if i in indices and r.get("status") == "failed"}
    if not again:
        return judged
    kept = {i: r for i, r in judged.items() if i not in again}
    atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept.values()))
    return kept


def score_summary(scores: Sequence[int], total: int, low: int, high: int, failed: int = 0) -> dict:
    """Mean, median, standard error of the mean, extremes and counts per score (over the scored
    items; `total` - scored - `failed` items were answered but unparseable)."""
    n = len(scores)
    out = {"n": total, "scored": n, "unparseable": total - n - failed, "failed": failed, "scale": [low, high],
           "mean": statistics.fmean(scores) if n else None,
           "median": statistics.median(scores) if n else None,
           "stderr": statistics.stdev(scores) / math.sqrt(n) if n > 1 else None,
           "min": min(scores) if n else None, "max": max(scores) if n else None,
           "counts": {str(k): v for k, v in sorted(Counter(scores).items())}}
    if (low, high) != (0, 100):  # a 0-100 reading of other scales, for comparing prompts
        out["mean_0_100"] = (out["mean"] - low) / (high - low) * 100 if n else None
    return out


def histogram_bins(low: int, high: int) -> list[float]:
    """One bar per score for small scales; ten bars (0-9, ..., 90-100) for 0-100."""
    if high - low <= 20:
        return [x - 0.5 for x in range(low, high + 2)]
    width = (high - low) / 10
    return [low + i * width for i in range(10)] + [high + 1e-9]


def histogram_png(scores_by_name: dict[str, Sequence[int]], low: int, high: int, title: str) -> bytes:
    """A histogram of judge scores (several runs side by side) as PNG bytes."""
    import io

    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=110)
    ax = fig.add_subplot()
    names = [n for n, s in scores_by_name.items() if s]
    if names:
        ax.hist([list(scores_by_name[n]) for n in names], bins=histogram_bins(low, high), label=names,
                edgecolor="white")
    ax.set_xlabel(f"judge score ({low}-{high})")
    ax.set_ylabel("responses")
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    if len(names) > 1:
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def judge_paths(responses: Path, out: str | None) -> tuple[Path, Path, Path]:
    """(scores JSONL, summary JSON, histogram PNG): responses-test.jsonl -> judge-test.*"""
    if out:
        scores = Path(out)
    else:
        stem = responses.stem
        stem = stem.replace("responses", "judge", 1) if "responses" in stem else stem + "-judge"
        scores = responses.with_name(stem + ".jsonl")
    return scores, scores.with_suffix(".json"), scores.with_suffix(".png")


def judge_command(responses: str, endpoint: str = "http://127.0.0.1:8000/v1", model: str | None = None,
                  prompt: str = "seed",
                  scale: tuple[int, int] | None = None, out: str | None = None, api_key_env: str | None = None,
                  concurrency: int = 4, retries: int = 2, seed: int | None = 0, max_tokens: int | None = 32,
                  timeout: float = 120.0, request_retries: int = 3, limit: int | None = None,
                  progress: bool = True) -> dict:
    """Score responses with an LLM judge over an OpenAI-compatible chat endpoint.

    Args:
        responses: responses JSONL (from `posttrain eval generate`): rows with reference, response,
            and prompt or instruction/input.
        endpoint: API root of the server, e.g. http://127.0.0.1:8000/v1 (posttrain serve),
            http://127.0.0.1:11434/v1 (Ollama), http://127.0.0.1:1234/v1 (LM Studio), or
            https://api.openai.com/v1.
        model: model name the server knows (as in its /v1/models); default: the one model the
            server lists, when it lists exactly one.
        prompt: seed (0-100, rasbt's prompt), rubric (1-5), or a prompt template file.
        scale: lowest and highest score for a prompt file, e.g. [1, 10] (default 0-100).
        out: per-item scores JSONL (default: judge-SPLIT.jsonl beside the responses); its summary
            (.json) and histogram (.png) go beside it. An existing file is continued.
        api_key_env: environment variable holding the API key (e.g. OPENAI_API_KEY); none sent if unset.
        concurrency: most requests in flight at once.
        retries: how many times an unparseable answer is asked again before it counts as unparseable.
        seed: seed sent with every request (dropped if the server refuses it); null to send none.
        max_tokens: most tokens of a judge's answer.
        timeout: seconds to wait for one answer.
        request_retries: retries of a failed request (connection errors, timeouts, 429, 5xx).
        limit: judge only the first N responses.
        progress: show a progress bar.
    """
    from tqdm.auto import tqdm

    from posttrain.eval.metrics import read_responses

    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    responses_path = Path(responses)
    rows = read_responses(responses_path)
    if limit is not None:
        rows = rows[:limit]
    indices = [int(r["index"]) for r in rows]
    if len(set(indices)) != len(indices):
        dup = next(i for i in indices if indices.count(i) > 1)
        raise ValueError(f"{responses_path}: index {dup} appears more than once; every row needs its own index")
    judge_prompt = load_prompt(prompt, tuple(scale) if scale else None)
    for row in rows:  # a template error shows before any request is sent
        try:
            judge_prompt.render(row)
        except ValueError as e:
            raise ValueError(f"{responses_path}: the row with index {row['index']}: {e}") from None
    scores_path, summary_path, png_path = judge_paths(responses_path, out)
    if model is None:  # which model judged a resumed file is in its rows
        model = next((r.get("judge") for r in read_judged(scores_path, None, judge_prompt).values()), None)
    done = read_judged(scores_path, model, judge_prompt) if model else {}
    # items not judged yet, and those the server refused last time (asked again)
    todo = [r for r in rows if int(r["index"]) not in done or done[int(r["index"])].get("status") == "failed"]
    retried = sum(int(r["index"]) in done for r in todo)
    print(f"judging {len(todo)} of {len(rows)} responses with {model} at {endpoint}"
          + (f" ({len(rows) - len(todo)} already in {scores_path})" if len(todo) < len(rows) else "")
          + (f"; {retried} of them failed before and are asked again" if retried else ""))

    if todo:
        client = JudgeClient(endpoint, model, api_key_env, timeout, request_retries)
        if model is None:
            model = client.only_model()
        client.check()  # before the failed rows are dropped: a server that is down changes nothing
        done = drop_failed(scores_path, done, {int(r["index"]) for r in todo})
        scores_path.parent.mkdir(parents=True, exist_ok=True)
        _judge_all(client, judge_prompt, todo, scores_path, model, concurrency, retries, seed, max_tokens,
                   tqdm(total=len(todo), unit="item", disable=not progress, desc="judge"))
        done = read_judged(scores_path, model, judge_prompt)

    judged = [done[int(r["index"])] for r in rows if int(r["index"]) in done]
    scores = [r["score"] for r in judged if r.get("score") is not None]
    failed = [r for r in judged if r.get("status") == "failed"]
    if failed and len(failed) == len(judged):  # e.g. --max_tokens over the server's limit: not one item's problem
        raise EndpointError(f"the judge refused every request ({len(failed)} failed, none answered); the first "
                            f"reason, item {failed[0]['index']}: {failed[0].get('error')}\nthe reasons are saved in "
                            f"{scores_path}; fix the request (--max_tokens, --prompt) or the server, and run the same "
                            "command again: failed items are asked again", failed[0].get("http_status"))
    summary = {"judge": model, "endpoint": endpoint, "prompt": judge_prompt.name,
               "prompt_id": judge_prompt.fingerprint, "responses": str(responses_path),
               **score_summary(scores, len(judged), judge_prompt.low, judge_prompt.high, len(failed))}
    if failed:
        summary["failed_items"] = [{"index": r["index"], "error": r.get("error")} for r in failed]
    atomic_write(summary_path, json.dumps(summary, indent=2))
    atomic_write(png_path, histogram_png({responses_path.parent.parent.name or "scores": scores},
                                         judge_prompt.low, judge_prompt.high, f"judge: {model}"))
    mean = f"{summary['mean']:.2f}" if summary["mean"] is not None else "n/a"
    stderr = f" ± {summary['stderr']:.2f}" if summary["stderr"] is not None else ""
    print(f"judge {model}: mean {mean}{stderr} (median {summary['median']}) over {summary['scored']} scored, "
          f"{summary['unparseable']} unparseable, {len(failed)} failed -> {scores_path}, {summary_path}, {png_path}")
    if failed:
        print(f"{len(failed)} item(s) refused by the judge (run again to ask for them again); the first, item "
              f"{failed[0]['index']}: {failed[0].get('error')}")
    return summary


def _judge_all(client: JudgeClient, prompt: JudgePrompt, rows: list[dict], path: Path, judge_model: str,
               concurrency: int, retries: int, seed: int | None, max_tokens: int | None, bar) -> None:
    """Judge rows on a bounded pool; append each result to `path` the moment it is known.

    A fatal error (endpoint gone, wrong model) stops new requests; finished items stay saved and the
    error says how many. An item the server refused alone (judge_one's "failed") is saved like the rest.
    """
    written, error = 0, None
    # A refusal that concerns every request (--max_tokens over the server's limit, say) shows in the
    # first answers: after this many refusals and no answer, stop instead of asking for every item.
    all_refused_after, refused, answered = min(len(rows), max(concurrency, 8)), 0, 0
    with open(path, "a") as f, ThreadPoolExecutor(max_workers=concurrency) as pool:
        pending = {pool.submit(judge_one, client, prompt, row, retries, seed, max_tokens): row for row in rows}

        def save(future) -> None:
            nonlocal written, error, refused, answered
            row = pending.pop(future)
            if future.cancelled():
                return
            if future.exception() is not None:
                error = error or future.exception()
                return
            record = {"index": int(row["index"]), **future.result(), "judge": judge_model,
                      "prompt_id": prompt.fingerprint}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()  # on disk before anything else can fail
            written += 1
            bar.update(1)
            refused, answered = refused + (record["status"] == "failed"), answered + (record["status"] != "failed")
            if not answered and refused == all_refused_after and error is None:
                error = EndpointError(f"the judge refused the first {refused} requests and answered none; the "
                                      f"first reason: {record.get('error')}", record.get("http_status"))

        try:
            while pending and error is None:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    save(future)
        finally:  # an error or Ctrl-C: send nothing new, keep what the requests in flight bring back
            for future in pending:
                future.cancel()
            for future in list(pending):
                try:
                    future.exception()  # waits for a running request
                except BaseException:
                    pass
                save(future)
            bar.close()
    if error is not None:
        if isinstance(error, EndpointError):
            raise EndpointError(f"{error}\n{written} newly judged items are saved in {path}; run the same "
                                "command again to continue from there") from None
        raise error
