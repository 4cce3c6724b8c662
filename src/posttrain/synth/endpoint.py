"""A small client for OpenAI-compatible chat endpoints: timeouts, bounded retries, bounded concurrency.

    endpoint = ChatEndpoint("http://127.0.0.1:8000/v1", "my-model", api_key_env="OPENAI_API_KEY")
    reply = endpoint.chat([{"role": "user", "content": "Hi"}], temperature=0.0, seed=1, max_tokens=64)
    reply.text, reply.finish_reason, reply.usage

    replies = endpoint.chat_many(conversations, temperature=0.0)     # concurrently, in order
    async with endpoint.session() as s:                              # inside your own event loop
        reply = await s.chat(messages)

Any server that speaks POST {base_url}/chat/completions works: OpenAI, vLLM, llama.cpp's server,
Ollama, or `posttrain serve`. `ChatEndpoint.local(model)` serves a posttrain model in-process (its
batching engine, no socket) behind the same interface.

Failures: connection errors, timeouts, 429 and 5xx answers are retried up to `max_retries` times
with exponential backoff (a server's Retry-After is honoured, capped); other 4xx answers (a wrong
key, an unknown model, a bad request) are not retried. A request that fails for good raises
EndpointError, saying what was asked of whom, how often, and what to check.

The key comes from an environment variable (`api_key_env`), never from an argument, so it stays
out of configs, logs and shell history.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import httpx

RETRY_STATUS = (408, 409, 429, 500, 502, 503, 504)


class EndpointError(ConnectionError):
    """A request that failed for good: after its retries, or at once for a non-retryable answer.

    A ConnectionError (an OSError): `posttrain` reports it in one line, as it does missing files."""

    def __init__(self, message: str, status: int | None = None, attempts: int = 1):
        super().__init__(message)
        self.status, self.attempts = status, attempts


@dataclass
class ChatResult:
    """One chat completion: the reply's text (never None), why it ended, token usage, attempts taken."""
    text: str
    finish_reason: str | None = None
    usage: dict = field(default_factory=dict)
    model: str | None = None
    attempts: int = 1
    error: str | None = None  # set by callers that keep a refused request in place of raising


def normalize_base_url(base_url: str) -> str:
    """`http://host:port` -> `http://host:port/v1` (OpenAI's layout); a URL with a path is kept as it is."""
    parts = urlsplit(base_url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"endpoint {base_url!r} is not an http(s) URL such as http://127.0.0.1:8000/v1")
    path = parts.path.rstrip("/") or "/v1"
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


class ChatEndpoint:
    """An OpenAI-compatible /chat/completions endpoint.

    base_url: e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1 (a bare host gets /v1).
    model: the model name the server expects. api_key_env: environment variable holding the key
    (sent as `Authorization: Bearer`); None for servers without one. timeout: seconds per attempt.
    max_retries: further attempts after a failed one. concurrency: most requests in flight at once
    in `chat_many` and a `session()`. backoff: first retry delay in seconds (doubles, capped at
    max_backoff).
    """

    def __init__(self, base_url: str, model: str, api_key_env: str | None = None, timeout: float = 60.0,
                 max_retries: int = 3, concurrency: int = 8, backoff: float = 0.5, max_backoff: float = 20.0,
                 transport_factory: Callable[[], httpx.AsyncBaseTransport] | None = None,
                 lifespan: Callable[[], contextlib.AbstractAsyncContextManager] | None = None):
        if max_retries < 0 or concurrency < 1 or timeout <= 0:
            raise ValueError(f"need max_retries >= 0, concurrency >= 1 and timeout > 0; got {max_retries}, "
                             f"{concurrency}, {timeout}")
        self.base_url, self.model = normalize_base_url(base_url), model
        self.url = self.base_url + "/chat/completions"
        self.api_key_env = api_key_env
        self.timeout, self.max_retries, self.concurrency = timeout, max_retries, concurrency
        self.backoff, self.max_backoff = backoff, max_backoff
        # local() serves in-process through these: a fresh ASGI transport (and app) per session, whose
        # lifespan starts and stops the generation engine.
        self._transport_factory, self._lifespan = transport_factory, lifespan
        self.headers = {"Content-Type": "application/json"}
        if api_key_env:
            key = os.environ.get(api_key_env, "")
            if not key:
                raise ValueError(f"api_key_env {api_key_env}: that environment variable is unset or empty; "
                                 f"export {api_key_env}=<key>, or leave api_key_env unset for a server without a key")
            self.headers["Authorization"] = f"Bearer {key}"

    # -- a local posttrain model ----------------------------------------------------------------

    @classmethod
    def local(cls, model: str, style: str | None = None, max_batch: int = 8, device: str | None = None,
              name: str = "local", **kwargs) -> "ChatEndpoint":
        """A posttrain model behind this interface, in-process: posttrain.serve's app (its batching
        engine, prompt styles and stops) reached through httpx's ASGI transport, with no socket.
        Async use only (chat_many, session); requests sent together are decoded as one batch."""
        from posttrain.generate import load_for_inference, resolve_style
        from posttrain.serve import create_app

        net, tokenizer = load_for_inference(model, device)
        prompt_style = resolve_style(style, tokenizer, model, net)
        holder: dict = {}

        def transport_factory():
            holder["app"] = create_app(net, tokenizer, name, style=prompt_style, max_batch=max_batch)
            return httpx.ASGITransport(app=holder["app"])

        def lifespan():
            return holder["app"].router.lifespan_context(holder["app"])  # starts and stops the engine

        return cls("http://posttrain.local/v1", name, None, transport_factory=transport_factory, lifespan=lifespan,
                   **kwargs)

    # -- requests -------------------------------------------------------------------------------

    def _body(self, messages: Sequence[dict], temperature: float | None, seed: int | None,
              max_tokens: int | None, extra: dict) -> dict:
        body = {"model": self.model, "messages": list(messages), **extra}
        if temperature is not None:
            body["temperature"] = temperature
        if seed is not None:
            body["seed"] = seed
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        return body

    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        """Seconds to wait before retry `attempt` (1-based): the server's Retry-After, else backoff."""
        if response is not None:
            after = response.headers.get("retry-after", "")
            try:
                return min(float(after), self.max_backoff)
            except ValueError:
                pass
        base = min(self.backoff * 2 ** (attempt - 1), self.max_backoff)
        return base * (1 + 0.1 * random.random())  # a little jitter: retries of many clients spread out

    def _outcome(self, response: httpx.Response | None, error: Exception | None, attempts: int
                 ) -> tuple[ChatResult | None, bool, str, int | None]:
        """(result, retryable, what went wrong, status) of one attempt."""
        if error is not None:
            kind = "timed out" if isinstance(error, httpx.TimeoutException) else "could not connect or read"
            return None, True, f"{kind} ({type(error).__name__}: {error or 'no detail'})", None
        status = response.status_code
        if status != 200:
            detail = _error_message(response)
            return None, status in RETRY_STATUS or status >= 500, f"HTTP {status}: {detail}", status
        try:
            data = response.json()
            choice = data["choices"][0]
            message = choice.get("message") or {}
            text = message.get("content") or ""
            if isinstance(text, list):  # content parts
                text = "".join(p.get("text", "") for p in text if isinstance(p, dict))
            return ChatResult(text, choice.get("finish_reason"), data.get("usage") or {}, data.get("model"),
                              attempts), False, "", status
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
            return None, False, f"the answer is not an OpenAI chat completion ({type(e).__name__}: " \
                                f"{response.text[:200]!r})", status

    def _fail(self, attempts: int, why: str, status: int | None) -> EndpointError:
        hint = ("check that the server is running and reachable at that address, or raise timeout / max_retries"
                if status is None or status >= 500 or status in RETRY_STATUS else
                "check the model name, the API key (api_key_env) and the request")
        return EndpointError(f"POST {self.url} (model {self.model!r}) failed after {attempts} attempt"
                             f"{'s' if attempts != 1 else ''}: {why}; {hint}", status, attempts)

    def chat(self, messages: Sequence[dict], temperature: float | None = 0.0, seed: int | None = None,
             max_tokens: int | None = None, **extra) -> ChatResult:
        """One chat completion, synchronously (retries as the class says). `extra`: more body fields."""
        if self._lifespan is not None:
            return self.chat_many([messages], temperature, seed, max_tokens, **extra)[0]
        body = self._body(messages, temperature, seed, max_tokens, extra)
        with httpx.Client(timeout=self.timeout, headers=self.headers) as client:
            for attempt in range(1, self.max_retries + 2):
                response = error = None
                try:
                    response = client.post(self.url, json=body)
                except httpx.TransportError as e:  # timeouts are transport errors too
                    error = e
                result, retry, why, status = self._outcome(response, error, attempt)
                if result is not None:
                    return result
                if not retry or attempt > self.max_retries:
                    raise self._fail(attempt, why, status)
                time.sleep(self._delay(attempt, response))
        raise AssertionError("unreachable")

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator["ChatSession"]:
        """An async session: one connection pool, at most `concurrency` requests in flight."""
        async with contextlib.AsyncExitStack() as stack:
            transport = self._transport_factory() if self._transport_factory is not None else None
            limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
            client = await stack.enter_async_context(
                httpx.AsyncClient(timeout=self.timeout, headers=self.headers, limits=limits, transport=transport))
            if self._lifespan is not None:
                await stack.enter_async_context(self._lifespan())
            yield ChatSession(self, client)

    async def achat_many(self, conversations: Sequence[Sequence[dict]], temperature: float | None = 0.0,
                         seed: int | None = None, max_tokens: int | None = None, return_exceptions: bool = False,
                         **extra) -> list:
        """Chat completions of many conversations, `concurrency` at a time, in input order. With
        return_exceptions, a failed request gives its EndpointError in its place instead of raising."""
        async with self.session() as s:
            tasks = [s.chat(m, temperature, seed, max_tokens, **extra) for m in conversations]
            return await asyncio.gather(*tasks, return_exceptions=return_exceptions)

    def chat_many(self, conversations: Sequence[Sequence[dict]], temperature: float | None = 0.0,
                  seed: int | None = None, max_tokens: int | None = None, return_exceptions: bool = False,
                  **extra) -> list:
        """`achat_many` from synchronous code (runs its own event loop)."""
        return asyncio.run(self.achat_many(conversations, temperature, seed, max_tokens, return_exceptions, **extra))


class ChatSession:
    """Requests through one async client; a semaphore keeps at most `concurrency` in flight."""

    def __init__(self, endpoint: ChatEndpoint, client: httpx.AsyncClient):
        self.endpoint, self.client = endpoint, client
        self._slots = asyncio.Semaphore(endpoint.concurrency)
        self.requests = 0  # attempts sent, retries included

    async def chat(self, messages: Sequence[dict], temperature: float | None = 0.0, seed: int | None = None,
                   max_tokens: int | None = None, **extra) -> ChatResult:
        ep = self.endpoint
        body = ep._body(messages, temperature, seed, max_tokens, extra)
        for attempt in range(1, ep.max_retries + 2):
            response = error = None
            async with self._slots:  # the slot is held for the request only, not for the backoff
                self.requests += 1
                try:
                    response = await self.client.post(ep.url, json=body)
                except httpx.TransportError as e:
                    error = e
            result, retry, why, status = ep._outcome(response, error, attempt)
            if result is not None:
                return result
            if not retry or attempt > ep.max_retries:
                raise ep._fail(attempt, why, status)
            await asyncio.sleep(ep._delay(attempt, response))
        raise AssertionError("unreachable")


def _error_message(response: httpx.Response) -> str:
    """The server's own words: OpenAI's {"error": {"message": ...}} when present, else the body's start."""
    try:
        data = response.json()
        error = data.get("error") if isinstance(data, dict) else None
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])[:500]
        if isinstance(error, str):
            return error[:500]
    except ValueError:
        pass
    return response.text[:300] or response.reason_phrase
