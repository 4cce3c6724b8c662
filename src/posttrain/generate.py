"""Text generation: batched KV-cache decoding, sampling, stop strings and streaming.

Prompts of different lengths share one batch through left padding: pad slots carry document id
-1 and real tokens id 0, so no real token ever attends to padding, and each row's position ids
count from its own first real token. A row that finishes (EOS, a stop id, a stop string, its
token budget) is dropped from the batch and from the KV cache, so the batch shrinks as it goes.

Sampling follows Hugging Face's order (temperature, then top-k, then top-p) and draws every row
from its own torch.Generator, so a seeded row gives the same tokens whatever else is batched
with it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import torch
import torch.nn as nn

STYLE_FILE = "posttrain.json"  # beside a model saved by a training run: {"prompt_style": name}


@dataclass
class GenerationConfig:
    """How to continue a prompt. EOS (the tokenizer's and the model config's) always stops."""

    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None  # sample only among the k most likely tokens
    top_p: float | None = None  # sample only from the smallest set holding this probability mass
    seed: int | None = None  # None: a fresh random seed
    stop_strings: list[str] = field(default_factory=list)  # cut the text before the first one
    stop_ids: list[int] = field(default_factory=list)  # token ids that end generation (not returned)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be at least 1 (or None for no limit), got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (or None), got {self.top_p}")
        if isinstance(self.stop_strings, str):  # a lone string is an easy slip; it means one stop
            self.stop_strings = [self.stop_strings]
        if any(not s for s in self.stop_strings):
            raise ValueError(f"stop strings must be non-empty, got {self.stop_strings!r}")


@dataclass
class Generation:
    """One finished row: new tokens, their text, why it stopped, and token counts."""

    ids: list[int]  # new tokens, without the stop token and without tokens of a stop string
    text: str  # decoded new text, cut exactly where a stop string began
    finish_reason: str  # "stop" (EOS, stop id or stop string), "length" (budget or context) or "cancelled"
    prompt_tokens: int
    completion_tokens: int  # tokens the model produced, stop token included


class PromptStyle(Protocol):
    """Anything that turns a conversation into prompt token ids (posttrain.prompts' styles)."""

    def render(self, messages: list[dict], add_generation_prompt: bool = True): ...


def render_prompt(tokenizer, messages: list[dict], style: PromptStyle | None = None) -> list[int]:
    """Token ids of a conversation, ending where the assistant's reply begins.

    The single place where messages become a prompt for generation: a prompt style when given
    (posttrain.prompts.get_style), else the tokenizer's chat template. A style may return ids
    or (ids, trainable flags).
    """
    if style is not None:
        rendered = style.render(messages, add_generation_prompt=True)
    else:
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("this model's tokenizer has no chat template: choose a prompt style (--style "
                             "alpaca, chatml, ...) or send a plain completion prompt instead of messages")
        rendered = tokenizer.render_chat(messages, add_generation_prompt=True)
    ids = rendered[0] if isinstance(rendered, tuple) else rendered
    return list(ids)


def reply_stops(tokenizer, style: PromptStyle | None = None) -> tuple[list[str], list[int]]:
    """(stop strings, stop ids) that end an assistant reply in this prompt format.

    A style names its own (alpaca: "### Instruction:"); the tokenizer's chat template ends a turn
    with whichever end-of-turn token it uses (<|im_end|>, <|eot_id|>, ...).
    """
    if style is None and getattr(tokenizer, "chat_template", None):
        from posttrain.prompts import Template

        style = Template(tokenizer)
    if style is None:
        return [], []
    return list(getattr(style, "stop_strings", [])), list(getattr(style, "stop_ids", []))


def eos_ids(model: nn.Module, tokenizer) -> set[int]:
    """Every id that always ends generation: the tokenizer's EOS and stop ids (generation_config.json)
    and the model config's eos_token_id (an int or a list)."""
    ids = {tokenizer.eos_id, *getattr(tokenizer, "stop_ids", [])}
    config_eos = getattr(model.config, "eos_token_id", None)
    if isinstance(config_eos, int):
        ids.add(config_eos)
    elif config_eos:
        ids.update(config_eos)
    return ids


class IncrementalDecoder:
    """Turns a growing list of token ids into text pieces without splitting a character.

    Byte-level BPE tokens can hold part of a UTF-8 character; decoding them alone gives U+FFFD.
    A piece is released only once the text no longer ends in U+FFFD. Decoding a short window
    that starts one piece back (not the token alone) keeps tokenizers that drop a leading space
    at the start of a decode (SentencePiece) correct. Same scheme as text-generation-inference.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the window decoded for context
        self.read_offset = 0  # ids before this are already released as text

    def push(self, token: int) -> str:
        """Add one token; return the text it completes ("" while a character is still partial)."""
        self.ids.append(token)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        text = self.tokenizer.decode(self.ids[self.prefix_offset:])
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(prefix):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (at the end of generation, a broken character decodes as U+FFFD)."""
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        text = self.tokenizer.decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix):]


class _Row:
    """One sequence being generated: its new tokens, decoded text, and why it stopped."""

    def __init__(self, tokenizer, prompt_len: int, config: GenerationConfig, stop_ids: set[int],
                 context: int, track_text: bool):
        self.tokenizer = tokenizer
        self.config = config
        self.prompt_len = prompt_len
        self.stop_ids = stop_ids | set(config.stop_ids)
        self.stops = list(config.stop_strings)
        self.longest_stop = max((len(s) for s in self.stops), default=0)
        # the model cannot see past its context: stop there with "length"
        self.budget = min(config.max_new_tokens, context - prompt_len)
        self.decoder = IncrementalDecoder(tokenizer) if (track_text or self.stops) else None
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters of text already handed out by ready()
        self.produced = 0
        self.finish_reason: str | None = None

    def add(self, token: int) -> None:
        self.produced += 1
        if token in self.stop_ids:
            self.finish("stop")
            return
        self.ids.append(token)
        if self.decoder is not None:
            self._add_text(self.decoder.push(token))
        if self.finish_reason is None and self.produced >= self.budget:
            self.finish("length")

    def finish(self, reason: str) -> None:
        if self.finish_reason is not None:
            return
        if self.decoder is not None:
            self._add_text(self.decoder.flush())  # a held-back partial character, or nothing
        if self.finish_reason is None:
            self.finish_reason = reason

    def _add_text(self, piece: str) -> None:
        if not piece or self.finish_reason is not None:
            return
        # a new stop-string occurrence must end inside the new piece
        start = max(0, len(self.text) - self.longest_stop + 1)
        self.text += piece
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.ids = self._ids_within(self.text)
            self.finish_reason = "stop"

    def _ids_within(self, text: str) -> list[int]:
        """The longest prefix of our tokens whose text lies inside `text` (a token may straddle the cut)."""
        n = len(self.ids)
        while n > 0 and not text.startswith(self.tokenizer.decode(self.ids[:n])):
            n -= 1
        return self.ids[:n]

    def _held(self) -> int:
        """Length of the longest tail of the text that could be the start of a stop string."""
        for k in range(min(self.longest_stop - 1, len(self.text)), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0

    def ready(self) -> str:
        """New text that is safe to show: never a piece that a stop string might still claim."""
        end = len(self.text) if self.finish_reason is not None else len(self.text) - self._held()
        piece = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return piece

    def result(self) -> Generation:
        text = self.text if self.decoder is not None else self.tokenizer.decode(self.ids)
        return Generation(self.ids, text, self.finish_reason or "length", self.prompt_len, self.produced)


def _generator(seed: int | None, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def _filter_sorted(values: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                   log_norm: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k then top-p on logits sorted in descending order (B, N); also each row's kept mass.

    log_norm: log of each row's softmax normaliser (None: over the top-k of `values` itself).
    """
    rank = torch.arange(values.shape[-1], device=values.device)
    values = values.masked_fill(rank[None] >= top_k[:, None], float("-inf"))
    if log_norm is None:
        log_norm = values.logsumexp(dim=-1)
    probs = (values - log_norm[:, None]).exp()
    mass_before = probs.cumsum(dim=-1) - probs  # probability of all more likely tokens
    # keep a token while the tokens ranked above it hold less than p (the top token always stays)
    return values.masked_fill(mass_before >= top_p[:, None], float("-inf")), probs.sum(dim=-1)


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  candidates: int = 1024) -> torch.Tensor:
    """Set to -inf every token outside each row's top-k, then outside its nucleus (top-p).

    logits (B, V); top_k (B,) long (V = no limit); top_p (B,) float (1.0 = no limit). Top-p is
    taken over the probabilities left after top-k, as Hugging Face's warpers do. Sorting a whole
    vocabulary every step is slow on a CPU, so the `candidates` most likely tokens are tried
    first; a row is finished there when its top-k set, or its nucleus, fits inside them (exact),
    and only the other rows are sorted in full.
    """
    vocab = logits.shape[-1]
    width = min(vocab, candidates)
    values, order = logits.topk(width, dim=-1)  # sorted, descending
    within_k = top_k <= width
    log_norm = torch.where(within_k, values.masked_fill(
        torch.arange(width, device=logits.device)[None] >= top_k[:, None], float("-inf")).logsumexp(dim=-1),
        logits.logsumexp(dim=-1))
    values, mass = _filter_sorted(values, top_k, top_p, log_norm)
    unfiltered = (top_k >= vocab) & (top_p >= 1)  # a row batched with others that do filter
    complete = within_k | ((top_k >= vocab) & (mass >= top_p)) | unfiltered
    out = torch.full_like(logits, float("-inf")).scatter(-1, order, values)
    out = torch.where(unfiltered[:, None], logits, out)
    if not bool(complete.all()):
        rows = (~complete).nonzero().squeeze(1)
        values, order = logits[rows].sort(dim=-1, descending=True)
        values, _ = _filter_sorted(values, top_k[rows], top_p[rows], None)
        out[rows] = torch.full_like(values, float("-inf")).scatter(-1, order, values)
    return out


def sample_next(logits: torch.Tensor, configs: Sequence[GenerationConfig],
                generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Next token per row (B,) from last-position logits (B, V), each row by its own config."""
    logits = logits.float()
    tokens = logits.argmax(dim=-1)
    sampled = [i for i, c in enumerate(configs) if c.temperature > 0]
    if not sampled:
        return tokens
    rows = torch.tensor(sampled, device=logits.device)
    vocab = logits.shape[-1]
    temperature = torch.tensor([configs[i].temperature for i in sampled], device=logits.device)
    scaled = logits[rows] / temperature[:, None]
    if any(configs[i].top_k is not None or configs[i].top_p is not None for i in sampled):
        top_k = torch.tensor([configs[i].top_k or vocab for i in sampled], device=logits.device)
        top_p = torch.tensor([configs[i].top_p or 1.0 for i in sampled], device=logits.device)
        scaled = filter_logits(scaled, top_k, top_p)
    probs = scaled.softmax(dim=-1)
    draws = [torch.multinomial(probs[j], 1, generator=generators[i]) for j, i in enumerate(sampled)]
    tokens[rows] = torch.cat(draws)
    return tokens


def _last_logits(model: nn.Module, input_ids, position_ids, document_ids, cache) -> torch.Tensor:
    """Logits of the last position only: the LM head over a whole prompt would waste (T, V) memory."""
    if hasattr(model, "hidden") and hasattr(model, "lm_head"):
        hidden = model.hidden(input_ids, position_ids=position_ids, document_ids=document_ids, cache=cache)
        return model.lm_head(hidden[:, -1])
    return model(input_ids, position_ids=position_ids, document_ids=document_ids, cache=cache)[:, -1]


class BatchGeneration:
    """Generate continuations of several prompts in one batch.

    Iterate it to run the decoding loop; it yields (row, text piece) whenever a streamed row
    (`stream`: True for all rows, or one flag per row) has new text that is safe to show.
    `results` holds one Generation per prompt once the iteration is exhausted (`run()` does both).
    `cancel(row)` drops a row at the next step (e.g. a client that hung up). The model runs in eval
    mode under torch.inference_mode; its training flag is restored at the end.

    Continuous batching: `admit(free)`, when given, is called before every decoding step with the
    number of free rows (`max_rows` minus the rows still decoding) and returns new (prompt, config,
    stream) triples; they join the batch at once (rows len(prompts), len(prompts) + 1, ... in the
    order admitted) instead of waiting for the running rows to finish. A joining row's tokens are
    the ones it would get alone: its prompt is prefilled on its own, then its keys and values are
    placed beside the others' in one cache, right-aligned, the empty slots masked out. `on_finish(row, result)`,
    when given, hears of each row the step it finishes (its last streamed piece already yielded), so
    a short row's caller need not wait for the batch.
    """

    def __init__(self, model: nn.Module, tokenizer, prompts: Sequence[Sequence[int]],
                 configs: Sequence[GenerationConfig], stream: bool | Sequence[bool] = False,
                 admit: Callable[[int], list[tuple[Sequence[int], GenerationConfig, bool]]] | None = None,
                 max_rows: int | None = None, on_finish: Callable[[int, Generation], None] | None = None):
        if len(prompts) != len(configs):
            raise ValueError(f"{len(prompts)} prompts but {len(configs)} generation configs")
        self.model, self.tokenizer = model, tokenizer
        self.stream = [stream] * len(prompts) if isinstance(stream, bool) else list(stream)
        self.context = model.config.max_length
        self.prompts = [self._check_prompt(i, p) for i, p in enumerate(prompts)]
        self.configs = list(configs)
        stop_ids = eos_ids(model, tokenizer)
        self.rows = [_Row(tokenizer, len(p), c, stop_ids, self.context, s)
                     for p, c, s in zip(self.prompts, self.configs, self.stream)]
        self._cancelled: set[int] = set()
        self.results: list[Generation] | None = None
        self.admit, self.max_rows, self.on_finish = admit, max_rows or max(len(prompts), 1), on_finish
        self._stop_ids = stop_ids

    def _check_prompt(self, index: int, prompt: Sequence[int]) -> list[int]:
        prompt = [int(t) for t in prompt]
        if not prompt:  # nothing to condition on: start from BOS (GPT-2: <|endoftext|>), as HF does
            bos = self.tokenizer.bos_id
            prompt = [bos if bos is not None else self.tokenizer.eos_id]
        if len(prompt) >= self.context:
            raise ValueError(f"prompt {index} has {len(prompt)} tokens; the model's context is {self.context} "
                             "tokens, so nothing is left to generate: shorten the prompt")
        vocab = self.model.config.vocab_size
        outside = [t for t in prompt if not 0 <= t < vocab]
        if outside:  # e.g. tokens added to the tokenizer without resize_token_embeddings
            raise ValueError(f"prompt {index} holds token ids {outside[:5]} outside the model's vocabulary "
                             f"(0..{vocab - 1}): grow the embeddings (posttrain.prompts.resize_model_for_tokenizer)")
        return prompt

    def cancel(self, row: int) -> None:
        self._cancelled.add(row)

    def run(self) -> list[Generation]:
        for _ in self:
            pass
        return self.results

    def __iter__(self) -> Iterator[tuple[int, str]]:
        model = self.model
        was_training = model.training
        model.eval()
        try:
            yield from self._decode()
        finally:
            model.train(was_training)

    def _prefill(self, prompts: list[list[int]], width: int, extra: int):
        """Last-position logits of left-padded `prompts` and a cache of `width + extra` slots holding them."""
        model, device = self.model, next(self.model.parameters()).device
        lengths = [len(p) for p in prompts]
        # pad slots are masked out of every real token's attention, so their token is irrelevant:
        # id 0 exists in every vocabulary (a pad id may not, before the embeddings are resized)
        input_ids = torch.tensor([[0] * (width - n) + p for n, p in zip(lengths, prompts)], device=device)
        n_pad = torch.tensor([width - n for n in lengths], device=device)[:, None]
        slot = torch.arange(width, device=device)[None]
        document_ids = torch.where(slot < n_pad, -1, 0)  # pads: their own document, never attended to
        position_ids = (slot - n_pad).clamp(min=0)  # count from each row's first real token
        cache = model.new_cache(len(prompts), width + extra)
        return _last_logits(model, input_ids, position_ids, document_ids, cache), cache

    def _admit(self, active: list[int], logits, positions, cache, generators):
        """Rows that join the running batch (see the class docstring); the decoding state, extended."""
        free = self.max_rows - len(active)
        joining = self.admit(free) if free > 0 else []
        if not joining:
            return active, logits, positions, cache
        device = positions.device
        first = len(self.rows)
        prompts = [self._check_prompt(first + k, p) for k, (p, _, _) in enumerate(joining)]
        for prompt, (_, config, stream) in zip(prompts, joining):
            self.prompts.append(prompt)
            self.configs.append(config)
            self.stream.append(stream)
            self.rows.append(_Row(self.tokenizer, len(prompt), config, self._stop_ids, self.context, stream))
            generators.append(_generator(config.seed, device))
        new = list(range(first, len(self.rows)))
        # Prefilled only as wide as the joining prompts; then every row's filled slots are right-aligned
        # in one cache as wide as the widest, the empty slots on their left masked.
        new_logits, new_cache = self._prefill(prompts, max(len(p) for p in prompts), 0)
        width = max(cache.length, new_cache.length)
        extra = max(self.rows[i].budget - self.rows[i].produced for i in active + new)
        merged = cache.widened(width, width + extra, new_cache)
        positions = torch.cat([positions, torch.tensor([len(p) for p in prompts], device=device)])
        return active + new, torch.cat([logits, new_logits]), positions, merged

    def _decode(self) -> Iterator[tuple[int, str]]:
        model, rows = self.model, self.rows
        if not rows:
            self.results = []
            return
        device = next(model.parameters()).device
        generators = [_generator(c.seed, device) for c in self.configs]
        with torch.inference_mode():
            width = max(len(p) for p in self.prompts)
            logits, cache = self._prefill(self.prompts, width, max(r.budget for r in rows))
            positions = torch.tensor([len(p) for p in self.prompts], device=device)
        active = list(range(len(rows)))  # prompt index of each batch row still in the cache
        while True:
            with torch.inference_mode():
                if self.admit is not None:
                    active, logits, positions, cache = self._admit(active, logits, positions, cache, generators)
                tokens = sample_next(logits, [self.configs[i] for i in active], [generators[i] for i in active])
                for i, token in zip(active, tokens.tolist()):
                    rows[i].add(token)
                    if i in self._cancelled:
                        rows[i].finish("cancelled")
                keep = [b for b, i in enumerate(active) if rows[i].finish_reason is None]
                if keep and len(keep) < len(active):  # drop finished rows: the batch shrinks
                    index = torch.tensor(keep, device=device)
                    cache.keep_rows(index)
                    tokens, positions = tokens[index], positions[index]
                finished = [i for i in active if rows[i].finish_reason is not None]
                active = [active[b] for b in keep]
                if active:
                    logits = _last_logits(model, tokens[:, None], positions[:, None], None, cache)
                    positions = positions + 1
            for i in active + finished:
                if self.stream[i]:
                    piece = rows[i].ready()
                    if piece:
                        yield i, piece
            if self.on_finish is not None:
                for i in finished:
                    self.on_finish(i, rows[i].result())
            if not active:
                break
        self.results = [r.result() for r in rows]


def generate_batch(model: nn.Module, tokenizer, prompts: Sequence[Sequence[int]],
                   configs: Sequence[GenerationConfig]) -> list[Generation]:
    """Continue each prompt with its own config (seed, temperature, stops, budget), batched."""
    return BatchGeneration(model, tokenizer, prompts, configs).run()


def _row_configs(config: GenerationConfig, n: int) -> list[GenerationConfig]:
    """One config per row; a seeded config seeds row i with seed + i so rows differ but repeat."""
    if config.seed is None:
        return [config] * n
    return [replace(config, seed=config.seed + i) for i in range(n)]


def generate(model: nn.Module, tokenizer, prompts: Sequence[Sequence[int]],
             config: GenerationConfig | None = None) -> list[list[int]]:
    """New token ids for each prompt (prompt excluded; stop token and stop-string tokens trimmed).

    Prompts may differ in length (they are left-padded into one batch). With a seed, row i
    samples from a generator seeded with `seed + i`: the same call gives the same tokens.
    """
    config = config or GenerationConfig()
    return [g.ids for g in generate_batch(model, tokenizer, prompts, _row_configs(config, len(prompts)))]


def generate_text(model: nn.Module, tokenizer, prompts: Sequence[Sequence[int]],
                  config: GenerationConfig | None = None) -> list[str]:
    """Like `generate`, but the decoded text of each continuation, cut exactly at a stop string."""
    config = config or GenerationConfig()
    return [g.text for g in generate_batch(model, tokenizer, prompts, _row_configs(config, len(prompts)))]


def generate_stream(model: nn.Module, tokenizer, prompt: Sequence[int],
                    config: GenerationConfig | None = None) -> Iterator[str]:
    """Text pieces of one continuation as they are generated; joined, they equal the full text."""
    run = BatchGeneration(model, tokenizer, [prompt], [config or GenerationConfig()], stream=True)
    for _, piece in run:
        yield piece


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Ids of a raw prompt written by the user (not data): special-token strings such as
    "<|im_start|>" ARE parsed, so a chat-template prefix works; BOS when the model expects one."""
    ids = tokenizer.encode_markup(text)
    if getattr(tokenizer, "add_bos", False) and tokenizer.bos_id is not None and ids[:1] != [tokenizer.bos_id]:
        ids = [tokenizer.bos_id] + ids
    return ids


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_for_inference(model: str, device: str | None = None, dtype: str | None = None):
    """(model, tokenizer) for generation: CUDA in bfloat16 when there is a GPU, else CPU in float32."""
    from posttrain.weights import load  # deferred: loading pulls in hub/GGUF machinery

    device = device or default_device()
    if dtype is None:
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    try:
        torch_dtype = getattr(torch, dtype)
    except AttributeError:
        raise ValueError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16") from None
    net, tokenizer = load(model, dtype=torch_dtype, device=device)
    return net.eval(), tokenizer


def saved_style(model: str) -> str | None:
    """The prompt style a posttrain run trained `model` with (its posttrain.json), or None.

    `model` may be the saved model directory or the run directory that holds it in model/.
    """
    path = Path(str(model)).expanduser()
    for candidate in (path / STYLE_FILE, path / "model" / STYLE_FILE):
        if candidate.is_file():
            return json.loads(candidate.read_text()).get("prompt_style")
    return None


def resolve_style(style: str | None, tokenizer, model: str | None = None,
                  net: nn.Module | None = None) -> PromptStyle | None:
    """A prompt style by name (posttrain.prompts); with no name, the style `model` was trained with
    (a run's posttrain.json), else None for the tokenizer's chat template.

    A style may add special tokens to the tokenizer (chatml on GPT-2 adds <|im_start|>, <|im_end|>);
    `net`, when given, then grows its embeddings to match, or their ids would index past them.
    """
    if style is None and model is not None:
        style = saved_style(model)  # a model tuned on alpaca prompts answers alpaca prompts
    if style is None:
        return None
    from posttrain.prompts import get_style, resize_model_for_tokenizer

    prompt_style = get_style(style, tokenizer)
    if net is not None:
        resize_model_for_tokenizer(net, tokenizer)
    return prompt_style


def generate_command(model: str, prompt: str, max_new_tokens: int = 256, temperature: float = 0.0,
                     top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                     stop: list[str] | None = None, chat: bool = False, system: str | None = None,
                     style: str | None = None, device: str | None = None, dtype: str | None = None) -> None:
    """Continue a prompt and stream the text to the terminal.

    Args:
        model: preset alias, hub id, local Hugging Face directory, .gguf file or run directory.
        prompt: the text to continue (special tokens such as <|im_start|> are parsed); with
            --chat, the user's message.
        max_new_tokens: most tokens to generate.
        temperature: sampling temperature; 0 is greedy decoding.
        top_k: sample among the k most likely tokens only.
        top_p: nucleus sampling: the smallest set of tokens holding this probability mass.
        seed: random seed for sampling (repeatable output).
        stop: strings that end the completion (not printed).
        chat: wrap the prompt as a user message (the model's chat template, or --style).
        system: system message for --chat.
        style: prompt style for --chat (alpaca, chatml, phi3, llama2, template, plain); default: the
            style a posttrain run trained the model with, else the tokenizer's chat template.
        device: cuda, cpu, ... (default: cuda when available).
        dtype: float32, bfloat16 or float16 (default: bfloat16 on CUDA, float32 on CPU).
    """
    net, tokenizer = load_for_inference(model, device, dtype)
    stop_strings, stop_ids = list(stop or []), []
    if chat:
        prompt_style = resolve_style(style, tokenizer, model, net)
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        ids = render_prompt(tokenizer, messages, prompt_style)
        reply_strings, stop_ids = reply_stops(tokenizer, prompt_style)
        stop_strings += reply_strings
    else:
        ids = encode_prompt(tokenizer, prompt)
        sys.stdout.write(prompt)
    config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                              seed=seed, stop_strings=stop_strings, stop_ids=stop_ids)
    for piece in generate_stream(net, tokenizer, ids, config):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
