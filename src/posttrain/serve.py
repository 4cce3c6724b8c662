"""An OpenAI-compatible HTTP server: /v1/models, /v1/chat/completions, /v1/completions.

`posttrain serve MODEL_OR_RUN` loads a model and serves it with FastAPI + uvicorn, bound to
127.0.0.1 unless told otherwise, with an optional API key (`Authorization: Bearer ...`). Any
OpenAI client (the `openai` package, LangChain, the judge in posttrain.eval) can then talk to it.

The model is not thread-safe, so one worker thread runs every generation, continuously batched:
requests that arrive together start one batch (posttrain.generate.BatchGeneration), and a request
that arrives while a batch decodes joins it at the next step, up to `max_batch` rows at once, so a
short request is not held up by a long one. Streamed rows receive their text pieces as they come.

Every failure a client can cause (bad JSON, wrong types, an unknown model, a prompt that does
not fit the context, an oversized body, a wrong key) is answered with a 4xx in OpenAI's error
shape: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import json
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch.nn as nn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from posttrain.generate import (
    BatchGeneration,
    Generation,
    GenerationConfig,
    PromptStyle,
    encode_prompt,
    load_for_inference,
    render_prompt,
    reply_stops,
    resolve_style,
)

DEFAULT_MAX_TOKENS_LIMIT = 2048
DEFAULT_MAX_BATCH = 8
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
MAX_CHOICES = 256  # prompts x n in one /v1/completions request


# -- errors --------------------------------------------------------------------------------------

class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status, content=error_body(self.message, self.type, self.param,
                                                                         self.code))


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _validation_error(error: ValidationError | RequestValidationError) -> APIError:
    """The first problem pydantic found, said as OpenAI would: which parameter and what was wrong."""
    first = error.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    where = f"'{param}': " if param else ""
    return APIError(400, f"{where}{first.get('msg', 'invalid value')} (got {first.get('input')!r:.200})",
                    param=param, code="invalid_value")


# -- request bodies ------------------------------------------------------------------------------

class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_dict(self) -> dict:
        content = self.content
        if isinstance(content, list):  # OpenAI's content parts; only text ones are meaningful here
            content = "".join(part.text for part in content)
        role = "system" if self.role == "developer" else self.role  # OpenAI's newer name for system
        return {"role": role, "content": content or ""}


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """Parameters shared by both endpoints. Unknown fields are ignored, as OpenAI's API does."""
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # vLLM's extension; -1 or 0 = no limit
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None


class ChatRequest(SamplingRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    logprobs: bool | None = None


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None


# -- the generation worker -----------------------------------------------------------------------

@dataclass
class Job:
    """One choice to generate; its events go to the queue of the HTTP request it belongs to."""
    index: int
    prompt: list[int]
    config: GenerationConfig
    stream: bool
    events: asyncio.Queue
    cancelled: bool = False
    run: BatchGeneration | None = None  # set by the worker while the job is being decoded
    row: int = 0

    def cancel(self) -> None:
        """The client went away: skip the job if it has not started, drop its row if it has."""
        self.cancelled = True
        if self.run is not None:
            self.run.cancel(self.row)  # a set insertion; the worker checks it at its next step


@dataclass
class EngineStats:
    requests: int = 0
    batches: int = 0
    rows: int = 0
    largest_batch: int = 0
    batch_sizes: list[int] = field(default_factory=list)  # the most recent ones


class Engine:
    """Runs every generation on one worker thread, continuously batched: jobs waiting together start
    one batch, and a job that arrives while a batch decodes joins it at the next step (up to
    `max_batch` rows at once) instead of waiting for the batch to finish."""

    def __init__(self, model: nn.Module, tokenizer, max_batch: int = DEFAULT_MAX_BATCH,
                 batch_wait_s: float = 0.005):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch, self.batch_wait_s = max_batch, batch_wait_s
        self.stats = EngineStats()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="posttrain-generate")
        # Waiting jobs: taken by the scheduler (a new batch) and by the worker thread (joiners), hence a lock.
        self._waiting: collections.deque[Job] = collections.deque()
        self._lock = threading.Lock()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._schedule())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True, cancel_futures=True)

    def submit(self, jobs: list[Job]) -> None:
        self.stats.requests += 1
        with self._lock:
            self._waiting.extend(jobs)
        self._wake.set()

    def _take(self, n: int) -> list[Job]:
        """Up to n waiting jobs whose clients are still there, oldest first (any thread)."""
        taken: list[Job] = []
        with self._lock:
            while self._waiting and len(taken) < n:
                job = self._waiting.popleft()
                if not job.cancelled:
                    taken.append(job)
        return taken

    def _count(self, joined: int, running: int) -> None:
        stats = self.stats
        stats.rows += joined
        stats.largest_batch = max(stats.largest_batch, running)

    async def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self.batch_wait_s:  # requests sent together arrive a moment apart
                await asyncio.sleep(self.batch_wait_s)
            while jobs := self._take(self.max_batch):
                self.stats.batches += 1
                self.stats.batch_sizes = (self.stats.batch_sizes + [len(jobs)])[-100:]
                self._count(len(jobs), len(jobs))
                try:  # the worker appends the jobs that join the batch to `jobs`
                    await loop.run_in_executor(self._executor, self._run, jobs, loop)
                except Exception as e:  # e.g. out of memory: fail these requests, keep serving
                    for job in jobs:
                        job.events.put_nowait(("error", job.index, e))

    def _run(self, jobs: list[Job], loop: asyncio.AbstractEventLoop) -> None:
        """On the worker thread: decode the batch, handing text pieces and results to the event loop."""

        def admit(free: int) -> list[tuple[list[int], GenerationConfig, bool]]:
            joining = self._take(free)
            for job in joining:
                job.run, job.row = run, len(jobs)
                jobs.append(job)
                if job.cancelled:  # hung up while being taken
                    run.cancel(job.row)
            self._count(len(joining), self.max_batch - free + len(joining))
            return [(j.prompt, j.config, j.stream) for j in joining]

        def finish(row: int, result) -> None:  # answered the step it ends, not when the batch does
            job = jobs[row]
            loop.call_soon_threadsafe(job.events.put_nowait, ("done", job.index, result))

        run = BatchGeneration(self.model, self.tokenizer, [j.prompt for j in jobs], [j.config for j in jobs],
                              stream=[j.stream for j in jobs], admit=admit, max_rows=self.max_batch,
                              on_finish=finish)
        for row, job in enumerate(list(jobs)):
            job.run, job.row = run, row
            if job.cancelled:  # hung up between scheduling and now
                run.cancel(row)
        for row, piece in run:
            job = jobs[row]
            loop.call_soon_threadsafe(job.events.put_nowait, ("text", job.index, piece))


# -- the app -------------------------------------------------------------------------------------

def create_app(model: nn.Module, tokenizer, model_name: str, api_key: str | None = None,
               style: PromptStyle | None = None, max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT,
               max_batch: int = DEFAULT_MAX_BATCH, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               batch_wait_s: float = 0.005) -> FastAPI:
    """The FastAPI application serving `model` under the name `model_name`.

    style: how chat messages become a prompt (posttrain.prompts); None = the tokenizer's chat
    template. max_tokens_limit caps max_tokens per choice; max_batch caps rows decoded together.
    """
    engine = Engine(model, tokenizer, max_batch=max_batch, batch_wait_s=batch_wait_s)
    context = model.config.max_length
    chat_stop_strings, chat_stop_ids = _chat_stops(tokenizer, style)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await engine.start()
        yield
        await engine.stop()

    app = FastAPI(title="posttrain", lifespan=lifespan)
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _request_validation(request: Request, exc: RequestValidationError):
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code).response()

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception):
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error").response()

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    async def read_body(request: Request, schema: type[BaseModel]) -> Any:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            raise APIError(413, f"request body is {declared} bytes; this server accepts at most {max_body_bytes}",
                           code="request_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body_bytes:
                raise APIError(413, f"request body exceeds {max_body_bytes} bytes", code="request_too_large")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}",
                           code="invalid_json")
        try:
            req = schema.model_validate(data)
        except ValidationError as e:
            raise _validation_error(e) from None
        if req.model != model_name:
            raise APIError(404, f"The model '{req.model}' does not exist; this server serves '{model_name}'",
                           param="model", code="model_not_found")
        return req

    def configs_for(req: SamplingRequest, prompt_len: int, prompt_param: str, stop_strings: list[str],
                    stop_ids: list[int]) -> list[GenerationConfig]:
        """One GenerationConfig per choice, after checking the request fits the model."""
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(req, name):
                raise APIError(400, f"{name} is not supported by this server", param=name,
                               code="unsupported_parameter")
        if req.logit_bias:
            raise APIError(400, "logit_bias is not supported by this server", param="logit_bias",
                           code="unsupported_parameter")
        if req.n > max_batch:
            raise APIError(400, f"n={req.n} exceeds this server's limit of {max_batch} choices", param="n")
        requested = getattr(req, "max_completion_tokens", None) or req.max_tokens
        if requested is not None and requested > max_tokens_limit:
            raise APIError(400, f"max_tokens={requested} exceeds this server's limit of {max_tokens_limit} "
                           "(serve --max_tokens_limit)", param="max_tokens", code="invalid_value")
        room = context - max(prompt_len, 1)
        if room < 1 or (requested is not None and requested > room):
            asked = requested if requested is not None else 1
            raise APIError(400, f"This model's maximum context length is {context} tokens. However, you "
                           f"requested {prompt_len + asked} tokens ({prompt_len} in the {prompt_param}, {asked} "
                           f"in the completion). Please reduce the length of the {prompt_param} or completion.",
                           param=prompt_param if requested is None else "max_tokens",
                           code="context_length_exceeded")
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if any(not s for s in stops):
            raise APIError(400, "stop sequences must be non-empty strings", param="stop")
        temperature = 1.0 if req.temperature is None else req.temperature  # OpenAI's default
        config = GenerationConfig(
            max_new_tokens=requested or min(max_tokens_limit, room), temperature=temperature,
            top_k=req.top_k if req.top_k and req.top_k > 0 else None,
            top_p=req.top_p if req.top_p is not None and req.top_p < 1 else None,
            seed=req.seed, stop_strings=stops + stop_strings, stop_ids=stop_ids)
        # n choices of one prompt must differ, and repeat with a seed: choice i draws from seed + i
        return [replace(config, seed=None if req.seed is None else req.seed + i) for i in range(req.n)]

    def completion_prompts(req: CompletionRequest) -> list[list[int]]:
        prompt = req.prompt
        if isinstance(prompt, str):
            return [encode_prompt(tokenizer, prompt)]
        if not prompt:
            raise APIError(400, "prompt must not be an empty list", param="prompt")
        if all(isinstance(p, str) for p in prompt):
            return [encode_prompt(tokenizer, p) for p in prompt]
        prompts = [prompt] if all(isinstance(t, int) for t in prompt) else prompt
        vocab = model.config.vocab_size
        for p in prompts:
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise APIError(400, f"prompt token ids must lie in [0, {vocab}); got {bad[:5]}", param="prompt")
        return [list(p) for p in prompts]

    def run_jobs(prompts: list[list[int]], configs_per_prompt: list[list[GenerationConfig]],
                 stream: bool) -> tuple[list[Job], asyncio.Queue]:
        events: asyncio.Queue = asyncio.Queue()
        jobs, index = [], 0
        for prompt, configs in zip(prompts, configs_per_prompt):
            for config in configs:
                jobs.append(Job(index, prompt, config, stream, events))
                index += 1
        engine.submit(jobs)
        return jobs, events

    async def collect(jobs: list[Job], events: asyncio.Queue) -> list[Generation]:
        results: list[Generation | None] = [None] * len(jobs)
        try:
            while any(r is None for r in results):
                kind, index, payload = await events.get()
                if kind == "error":
                    raise APIError(500, f"generation failed: {type(payload).__name__}: {payload}", type="server_error")
                if kind == "done":
                    results[index] = payload
        finally:
            for job in jobs:  # the client went away (or we failed): free the rows
                job.cancel()
        return results

    def usage(prompts: list[list[int]], results: list[Generation]) -> dict:
        prompt_tokens = sum(len(p) for p in prompts)
        completion_tokens = sum(r.completion_tokens for r in results)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def finish_reason(result: Generation) -> str:
        return "length" if result.finish_reason == "length" else "stop"

    def sse(jobs: list[Job], events: asyncio.Queue, chunk, final, usage_chunk, include_usage: bool,
            prompts: list[list[int]]):
        """Server-sent events: `data: {json}\\n\\n` per chunk, ending `data: [DONE]`."""

        async def stream():
            results: list[Generation | None] = [None] * len(jobs)
            try:
                for first in chunk(None, None):
                    yield f"data: {json.dumps(first)}\n\n"
                while any(r is None for r in results):
                    kind, index, payload = await events.get()
                    if kind == "error":
                        error = error_body(f"generation failed: {type(payload).__name__}: {payload}", "server_error")
                        yield f"data: {json.dumps(error)}\n\n"
                        break
                    if kind == "text":
                        for c in chunk(index, payload):
                            yield f"data: {json.dumps(c)}\n\n"
                    else:
                        results[index] = payload
                        yield f"data: {json.dumps(final(index, payload))}\n\n"
                else:
                    if include_usage:
                        yield f"data: {json.dumps(usage_chunk(usage(prompts, results)))}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                for job in jobs:  # the client hung up mid-stream: free the rows
                    job.cancel()

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/health")
    async def health() -> dict:
        """Liveness plus batching counters (how many requests, batches, rows, the largest batch)."""
        s = engine.stats
        return {"status": "ok", "model": model_name, "requests": s.requests, "batches": s.batches,
                "rows": s.rows, "largest_batch": s.largest_batch}

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def list_models() -> dict:
        return {"object": "list", "data": [_model_card(model_name, created, context)]}

    @app.get("/v1/models/{name:path}", dependencies=[Depends(authorize)])
    async def get_model(name: str) -> dict:
        if name != model_name:
            raise APIError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")
        return _model_card(model_name, created, context)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(request: Request):
        req: ChatRequest = await read_body(request, ChatRequest)
        if req.logprobs:
            raise APIError(400, "logprobs are not supported by this server", param="logprobs",
                           code="unsupported_parameter")
        try:
            prompt = render_prompt(tokenizer, [m.as_dict() for m in req.messages], style)
        except Exception as e:  # a template that rejects the conversation (roles must alternate, ...)
            raise APIError(400, f"cannot render these messages as a prompt: {e}", param="messages") from None
        configs = configs_for(req, len(prompt), "messages", chat_stop_strings, chat_stop_ids)
        jobs, events = run_jobs([prompt], [configs], req.stream)
        ident, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": ident, "object": "chat.completion.chunk", "created": now, "model": model_name,
                "system_fingerprint": None}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            extra = {"usage": None} if include_usage else {}

            def chunk(index, text):
                if index is None:  # the opening chunk of each choice carries the role
                    return [{**head, **extra, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                           "logprobs": None, "finish_reason": None}]}
                            for i in range(len(jobs))]
                return [{**head, **extra, "choices": [{"index": index, "delta": {"content": text},
                                                       "logprobs": None, "finish_reason": None}]}]

            def final(index, result):
                return {**head, **extra, "choices": [{"index": index, "delta": {}, "logprobs": None,
                                                      "finish_reason": finish_reason(result)}]}

            def usage_chunk(u):
                return {**head, "choices": [], "usage": u}

            return sse(jobs, events, chunk, final, usage_chunk, include_usage, [prompt])
        results = await collect(jobs, events)
        return {"id": ident, "object": "chat.completion", "created": now, "model": model_name,
                "system_fingerprint": None,
                "choices": [{"index": i, "message": {"role": "assistant", "content": r.text},
                             "logprobs": None, "finish_reason": finish_reason(r)} for i, r in enumerate(results)],
                "usage": usage([prompt], results)}

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(request: Request):
        req: CompletionRequest = await read_body(request, CompletionRequest)
        for name in ("echo", "logprobs", "suffix"):
            if getattr(req, name):
                raise APIError(400, f"{name} is not supported by this server", param=name,
                               code="unsupported_parameter")
        if req.best_of not in (None, 1, req.n):
            raise APIError(400, "best_of is not supported by this server", param="best_of",
                           code="unsupported_parameter")
        prompts = completion_prompts(req)
        if len(prompts) * req.n > MAX_CHOICES:
            raise APIError(400, f"{len(prompts)} prompts x n={req.n} choices: at most {MAX_CHOICES} per request",
                           param="prompt")
        configs = [configs_for(req, len(p), "prompt", [], []) for p in prompts]
        jobs, events = run_jobs(prompts, configs, req.stream)
        ident, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": ident, "object": "text_completion", "created": now, "model": model_name,
                "system_fingerprint": None}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            extra = {"usage": None} if include_usage else {}

            def chunk(index, text):
                if index is None:
                    return []
                return [{**head, **extra, "choices": [{"index": index, "text": text, "logprobs": None,
                                                       "finish_reason": None}]}]

            def final(index, result):
                return {**head, **extra, "choices": [{"index": index, "text": "", "logprobs": None,
                                                      "finish_reason": finish_reason(result)}]}

            def usage_chunk(u):
                return {**head, "choices": [], "usage": u}

            return sse(jobs, events, chunk, final, usage_chunk, include_usage, prompts)
        results = await collect(jobs, events)
        return {**head, "choices": [{"index": i, "text": r.text, "logprobs": None,
                                     "finish_reason": finish_reason(r)} for i, r in enumerate(results)],
                "usage": usage(prompts, results)}

    return app


def _model_card(name: str, created: int, context: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "posttrain", "max_model_len": context}


def _chat_stops(tokenizer, style: PromptStyle | None) -> tuple[list[str], list[int]]:
    """Stops that end an assistant reply; a tokenizer without a chat template serves completions only."""
    try:
        return reply_stops(tokenizer, style)
    except ValueError:
        return [], []


def serve_command(model: str, host: str = "127.0.0.1", port: int = 8000, api_key_env: str | None = None,
                  max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT, max_batch: int = DEFAULT_MAX_BATCH,
                  name: str | None = None, style: str | None = None, device: str | None = None,
                  dtype: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions).

    Args:
        model: preset alias, hub id, local Hugging Face directory, .gguf file or run directory.
        host: interface to bind; the default 127.0.0.1 is reachable from this machine only.
        port: TCP port.
        api_key_env: name of an environment variable holding the API key clients must send as
            'Authorization: Bearer <key>' (default: no key).
        max_tokens_limit: most tokens one completion may ask for.
        max_batch: most completions decoded together in one batch.
        name: the model name clients pass as `model` (default: the MODEL argument as given).
        style: prompt style for chat messages (alpaca, chatml, phi3, llama2, template, plain);
            default: the style a posttrain run trained the model with, else the tokenizer's chat
            template.
        device: cuda, cpu, ... (default: cuda when available).
        dtype: float32, bfloat16 or float16 (default: bfloat16 on CUDA, float32 on CPU).
        max_body_bytes: largest request body accepted (bigger ones get 413).
    """
    import uvicorn

    api_key = None
    if api_key_env:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise SystemExit(f"--api_key_env {api_key_env}: that environment variable is unset or empty; "
                             f"export {api_key_env}=<key> first")
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print(f"warning: serving on {host} without an API key; anyone who can reach this port can use it "
              "(set --api_key_env)", flush=True)
    net, tokenizer = load_for_inference(model, device, dtype)
    prompt_style = resolve_style(style, tokenizer, model, net)
    app = create_app(net, tokenizer, name or model, api_key=api_key, style=prompt_style,
                     max_tokens_limit=max_tokens_limit, max_batch=max_batch, max_body_bytes=max_body_bytes)
    print(f"serving {name or model} at http://{host}:{port}/v1", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info")


if __name__ == "__main__":  # python -m posttrain.serve MODEL [--port ...]
    from jsonargparse import CLI

    CLI(serve_command)
