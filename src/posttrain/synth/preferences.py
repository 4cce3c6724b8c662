"""Preference data from instruction data: every reference output rewritten twice by a chat model, once in
the preferred style (chosen) and once in the dispreferred one (rejected).

    posttrain synth preferences instruction-data.json prefs.jsonl \\
        --endpoint http://127.0.0.1:8000/v1 --model llama-3.1-70b --api_key_env OPENAI_API_KEY

The default rewrite is LLMs-from-scratch's (ch. 7, preference tuning): "slightly rewrite the output
to be more polite" (chosen) / "impolite" (rejected), keeping the change minimal. Any two styles can
be given (`--chosen_style concise --rejected_style verbose`), or a whole `--template` with the
fields {prompt}, {output} and {style}. The model answers through any OpenAI-compatible endpoint
(posttrain.synth.endpoint) or, with `--local_model`, a posttrain model in this process.

Input: instruction records of any format posttrain reads (Alpaca instruction/input/output, chat
`messages` ending in an assistant reply, prompt/completion). Output: JSON Lines, one record per
input record, in input order: the input record's fields plus `chosen`, `rejected` and
`source_index` (the record's position in the input; chat records keep their messages up to the
final reply as the prompt). posttrain dpo reads these files as they are.

Robustness:
- Records are written as they finish (in input order), one whole line each, flushed: a killed run
  loses at most the requests in flight. Run the same command again and it resumes: records whose
  source_index is already in OUT (or in the failures file) are not asked again, a torn last line
  is cut off, and a file from another input is refused.
- Empty answers, refusals (a content filter, or an answer that opens like a refusal) and requests
  the endpoint rejects as bad (HTTP 400, e.g. a prompt beyond its context) are not written to OUT;
  they go to OUT's `.failed.jsonl` sibling with the reason, and are counted and reported.
  `--retry_failed` asks for them again. (When the first records all get HTTP 400, the run stops:
  the requests themselves are wrong.)
- Requests run concurrently (at most `--concurrency` in flight); each is retried a bounded number
  of times on connection errors, timeouts, 429 and 5xx. A request that still fails stops the run
  with a clear error; everything written so far stays.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

from posttrain.data.formats import InvalidRecord, to_messages
from posttrain.data.sources import DataError, Record, load_records
from posttrain.synth.endpoint import ChatEndpoint, ChatResult, EndpointError

DEFAULT_TEMPLATE = ("Given the input `{prompt}` and correct output `{output}`, slightly rewrite the output to be "
                    "more {style}. Keep the modification minimal. Only return the generated response and nothing "
                    "else.")
INDEX_KEY = "source_index"
BAD_REQUEST_LIMIT = 5  # records refused with HTTP 400 before any success: the requests themselves are wrong
# How assistants open a refusal. Heuristic: only the start of the answer is matched, so an impolite
# rewrite that merely contains "I can't" later is kept.
REFUSAL = re.compile(r"^\W*(i'?m sorry,? but i|i am sorry,? but i|i apologi[sz]e,? but|as an ai\b|"
                     r"i (?:can ?not|can'?t|won'?t|am unable to|'m unable to|am not able to) "
                     r"(?:help|assist|comply|do that|fulfil|provide|rewrite|create|write|generate))",
                     re.IGNORECASE)


@dataclass
class SynthReport:
    """What a run did: records in the input, already done before it, written and failed now, by reason."""
    records: int = 0
    done_before: int = 0
    written: int = 0
    failed: Counter = field(default_factory=Counter)  # reason -> count (empty, refused)
    identical: int = 0        # written, but chosen == rejected (posttrain dpo drops these pairs)
    skipped_invalid: Counter = field(default_factory=Counter)
    requests: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        parts = [f"{self.written} records written ({self.done_before} were already done) of {self.records}"]
        if self.failed:
            parts.append("failed (in the .failed.jsonl file): " + ", ".join(f"{k} {v}" for k, v in self.failed.items()))
        if self.identical:
            parts.append(f"{self.identical} with chosen == rejected")
        if self.skipped_invalid:
            parts.append("skipped invalid input records: "
                         + ", ".join(f"{k} {v}" for k, v in self.skipped_invalid.items()))
        parts.append(f"{self.requests} requests in {self.seconds:.1f} s")
        return "; ".join(parts)

    def as_dict(self) -> dict:
        return {"records": self.records, "done_before": self.done_before, "written": self.written,
                "failed": dict(self.failed), "identical": self.identical,
                "skipped_invalid": dict(self.skipped_invalid), "requests": self.requests, "seconds": self.seconds}


def failed_path(out: Path) -> Path:
    """Where records without a usable answer go: prefs.jsonl -> prefs.failed.jsonl."""
    return out.with_name(f"{out.stem}.failed.jsonl" if out.suffix else f"{out.name}.failed.jsonl")


def prompt_text(messages: list[dict]) -> str:
    """The prompt as the rewriting model sees it: a lone user message as it is, else `role: content` lines."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def rewrite_request(template: str, prompt: str, output: str, style: str) -> list[dict]:
    return [{"role": "user", "content": template.format(prompt=prompt, output=output, style=style)}]


def refusal_reason(result: ChatResult) -> str | None:
    """'bad_request', 'empty', 'refused' or None for a usable answer."""
    if result.error is not None:
        return "bad_request"
    if result.finish_reason == "content_filter":
        return "refused"
    text = result.text.strip()
    if not text:
        return "empty"
    if REFUSAL.match(text):
        return "refused"
    return None


# -- the output file --------------------------------------------------------------------------------

def repair_tail(path: Path) -> None:
    """Cut a torn last line (a run killed while writing it) so that appended records start on a line."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return
        f.truncate(data.rfind(b"\n") + 1)


def done_indices(path: Path, expected: dict[int, dict] | None) -> set[int]:
    """source_index of every complete record in `path`. `expected` (index -> the input record's fields):
    each record must carry its input record's fields, else the file came from another input."""
    done: set[int] = set()
    if not path.is_file():
        return done
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                index = int(row[INDEX_KEY])
            except (ValueError, KeyError, TypeError):
                raise DataError(f"{path}:{line_no}: not a record of posttrain synth preferences (no "
                                f"{INDEX_KEY}); choose a new output file or delete this one") from None
            if expected is not None:
                fields = expected.get(index)
                if fields is None or any(row.get(k) != v for k, v in fields.items()):
                    raise DataError(f"{path}:{line_no}: record {index} was not written from this input (its "
                                    f"fields differ); choose a new output file, or the input it was made from")
            done.add(index)
    return done


class LineWriter:
    """Appends one JSON record per line, flushed to the OS at once (a kill loses nothing written)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        repair_tail(path)
        self.path, self.file = path, open(path, "a", encoding="utf-8")

    def write(self, row: dict) -> None:
        self.file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


# -- records ------------------------------------------------------------------------------------------

def split_record(record: Record) -> tuple[dict, list[dict], str]:
    """(fields to keep in the output, prompt messages, reference output) of one instruction record."""
    messages = to_messages(record)
    if messages[-1]["role"] != "assistant":
        raise InvalidRecord(record, "the last message is not an assistant reply", "there is no output to rewrite")
    prompt = [{"role": m["role"], "content": m["content"]} for m in messages[:-1]]
    fields = {k: v for k, v in record.data.items() if k not in ("chosen", "rejected", INDEX_KEY)}  # made anew
    for key in ("messages", "conversations"):
        if key in fields:  # chat records: the prompt is the conversation before the final reply
            del fields[key]
            fields["messages"] = prompt
    return fields, prompt, messages[-1]["content"]


async def _synthesize(endpoint: ChatEndpoint, todo: list[tuple[int, dict, list[dict], str]], writer: LineWriter,
                      failures: LineWriter, report: SynthReport, template: str, chosen_style: str,
                      rejected_style: str, temperature: float, seed: int | None, max_tokens: int, progress) -> None:
    """Ask for both rewrites of every record, `window` records at a time, writing results in order."""
    async with endpoint.session() as session:
        async def ask(messages: list[dict]) -> ChatResult:
            try:
                return await session.chat(messages, temperature, seed, max_tokens)
            except EndpointError as e:
                if e.status != 400:  # unreachable, wrong key or model, server errors: stop the run
                    raise
                # This request only (e.g. a prompt beyond the model's context): a failed record, not a failed run.
                return ChatResult("", error=str(e))

        async def one(index: int, prompt: list[dict], output: str) -> tuple[ChatResult, ChatResult]:
            text = prompt_text(prompt)
            return await asyncio.gather(ask(rewrite_request(template, text, output, chosen_style)),
                                        ask(rewrite_request(template, text, output, rejected_style)))

        window = 2 * endpoint.concurrency  # records in flight; the session bounds the requests
        pending: deque = deque()
        items = iter(todo)
        try:
            while True:
                while len(pending) < window:
                    item = next(items, None)
                    if item is None:
                        break
                    index, fields, prompt, output = item
                    pending.append((item, asyncio.ensure_future(one(index, prompt, output))))
                if not pending:
                    break
                (index, fields, prompt, output), task = pending.popleft()
                chosen, rejected = await task  # in input order: the file stays a prefix of the input
                reasons = {"chosen": refusal_reason(chosen), "rejected": refusal_reason(rejected)}
                bad = {k: v for k, v in reasons.items() if v}
                if bad:
                    for reason in set(bad.values()):
                        report.failed[reason] += 1
                    row = {INDEX_KEY: index, "reason": bad, "chosen": chosen.text, "rejected": rejected.text,
                           "finish_reasons": [chosen.finish_reason, rejected.finish_reason]}
                    errors = [r.error for r in (chosen, rejected) if r.error]
                    if errors:
                        row["error"] = errors[0]
                    failures.write(row)
                    if report.failed["bad_request"] >= BAD_REQUEST_LIMIT and report.written == 0:
                        last = errors[0] if errors else "-"
                        raise EndpointError(f"the first {BAD_REQUEST_LIMIT} records were all refused as bad requests "
                                            f"(HTTP 400), so every request probably is; the last: {last}", 400)
                else:
                    row = {**fields, "chosen": chosen.text.strip(), "rejected": rejected.text.strip(), INDEX_KEY: index}
                    writer.write(row)
                    report.written += 1
                    report.identical += row["chosen"] == row["rejected"]
                progress(1)
        finally:
            for _, task in pending:  # stopped by an error: the requests in flight are abandoned
                task.cancel()
            await asyncio.gather(*(t for _, t in pending), return_exceptions=True)
            report.requests += session.requests


def synth_preferences(data: str, out: str, endpoint: str | None = None, model: str | None = None,
                      api_key_env: str | None = None, local_model: str | None = None,
                      chosen_style: str = "polite", rejected_style: str = "impolite",
                      template: str = DEFAULT_TEMPLATE, temperature: float = 0.0, seed: int | None = None,
                      max_tokens: int = 512, concurrency: int = 8, timeout: float = 120.0, max_retries: int = 3,
                      limit: int | None = None, skip_invalid: bool = False, retry_failed: bool = False,
                      progress: bool = True) -> dict:
    """Rewrite every reference output into a preferred (chosen) and a dispreferred (rejected) version.

    Writes JSON Lines as it goes and resumes where it stopped when run again with the same OUT.

    Args:
        data: instruction data: a file or folder (json, jsonl, csv, parquet), URL or hub dataset id.
        out: output .jsonl file (appended to and resumed).
        endpoint: base URL of an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 or https://api.openai.com/v1.
        model: model name at that endpoint.
        api_key_env: environment variable holding the endpoint's API key (none for a server without one).
        local_model: instead of an endpoint: a posttrain model (path, run directory, preset), run here.
        chosen_style: the style the chosen rewrite should have more of (the template's {style}).
        rejected_style: the style the rejected rewrite should have more of.
        template: the rewriting instruction; fields {prompt}, {output}, {style}.
        temperature: sampling temperature of the rewrites.
        seed: sampling seed sent with every request (servers that support it repeat their answers).
        max_tokens: most tokens per rewrite.
        concurrency: most requests in flight at once.
        timeout: seconds per request attempt.
        max_retries: further attempts of a request after a connection error, timeout, 429 or 5xx.
        limit: handle only the first LIMIT input records.
        skip_invalid: count and skip input records that are not instruction records.
        retry_failed: ask again for the records in the failures file (else they count as done).
        progress: show a progress bar.
    """
    for name, text in (("template", template),):
        missing = [f for f in ("{prompt}", "{output}", "{style}") if f not in text]
        if missing:
            raise ValueError(f"{name} must contain the fields {{prompt}}, {{output}} and {{style}}; it lacks {missing}")
    if (endpoint is None) == (local_model is None):
        raise ValueError("give either --endpoint (with --model) for an OpenAI-compatible endpoint, or --local_model "
                         "for a posttrain model run here")
    if endpoint is not None and not model:
        raise ValueError("--model is required with --endpoint: the model name the endpoint serves")
    out_path = Path(out)
    records = load_records(data)[:limit]
    if not records:
        raise DataError(f"{data}: no records")
    report = SynthReport(records=len(records))
    todo, keep = [], {}
    for index, record in enumerate(records):  # source_index: the position in the input (a folder's files in turn)
        try:
            fields, prompt, output = split_record(record)
        except InvalidRecord as e:
            if not skip_invalid:
                raise
            report.skipped_invalid[e.reason] += 1
            continue
        keep[index] = fields
        todo.append((index, fields, prompt, output))

    fail_path = failed_path(out_path)
    if retry_failed and fail_path.exists():
        fail_path.unlink()  # asked again below; failures that repeat are written again
    repair_tail(out_path)
    repair_tail(fail_path)
    done = done_indices(out_path, keep) | done_indices(fail_path, None)
    report.done_before = len(done)
    todo = [item for item in todo if item[0] not in done]

    endpoint = (ChatEndpoint.local(local_model, concurrency=concurrency, timeout=timeout, max_retries=max_retries)
                if local_model is not None else
                ChatEndpoint(endpoint, model, api_key_env, timeout=timeout, max_retries=max_retries,
                             concurrency=concurrency))
    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), unit="record", disable=not progress, desc="synth preferences")
    writer, failures = LineWriter(out_path), LineWriter(fail_path)
    started = time.perf_counter()
    try:
        asyncio.run(_synthesize(endpoint, todo, writer, failures, report, template, chosen_style, rejected_style,
                                temperature, seed, max_tokens, bar.update))
    finally:
        writer.close()
        failures.close()
        bar.close()
        report.seconds = time.perf_counter() - started
        if fail_path.exists() and fail_path.stat().st_size == 0:
            fail_path.unlink()
        print(report.summary(), flush=True)
    return report.as_dict()
