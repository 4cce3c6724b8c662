"""Tokenizers: a thin wrapper around Hugging Face `tokenizers` with safe encoding of data text.

Three rules shape this module:
  1. Text from data never becomes a special token. `encode` runs with the backend's
     `encode_special_tokens = True`, so "<|endoftext|>" typed by a user is ordinary text.
  2. Chat templates are rendered with jinja2 in a sandbox, as transformers does, but message contents
     never pass through special-token parsing: `render_chat` renders the template around sentinel
     strings, encodes the template pieces with special tokens and the contents as plain text.
  3. Which tokens are trained follows from the roles (assistant content and the end-of-turn token
     that closes it), never from searching the rendered string.

Sources: a directory with tokenizer.json (+ tokenizer_config.json), a GGUF file (its
tokenizer.ggml.* metadata, converted by transformers' GGUF tokenizer builder), or GPT-2's
encoder.json + vocab.bpe (`gpt2_tokenizer_from_files`).
"""

from __future__ import annotations

import json
import re
import secrets
from datetime import datetime
from pathlib import Path
from typing import Iterable, Sequence

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special tokens and chat template a model needs.

    eos_id: end of text / end of turn; pad_id falls back to it; bos_id may be None (GPT-2 has none
    distinct from EOS). stop_ids: every id that ends generation (EOS plus e.g. Llama 3's extra
    end-of-turn ids from generation_config.json). add_bos: whether the model was trained with a
    BOS token in front of each document (the data pipeline decides whether to pass bos=True).
    """

    def __init__(self, backend: tokenizers.Tokenizer, *, eos_token: str, bos_token: str | None = None,
                 pad_token: str | None = None, chat_template: str | None = None,
                 stop_tokens: Iterable[str] = (), add_bos: bool | None = None):
        # Two copies of the backend: one that never parses special tokens (data text), one that
        # does (template text). A flag toggled on one object would race across threads (serve.py).
        self._text = tokenizers.Tokenizer.from_str(backend.to_str())
        self._text.encode_special_tokens = True
        self._markup = tokenizers.Tokenizer.from_str(backend.to_str())
        self._markup.encode_special_tokens = False
        self.eos_id: int = self._require(eos_token, "eos_token")
        self.bos_id: int | None = self._require(bos_token, "bos_token") if bos_token is not None else None
        self.pad_id: int = self._require(pad_token, "pad_token") if pad_token is not None else self.eos_id
        self.stop_ids: list[int] = [self.eos_id] + [
            i for i in (self._markup.token_to_id(t) for t in stop_tokens) if i is not None and i != self.eos_id]
        self.chat_template: str | None = chat_template
        if add_bos is None:  # e.g. Llama 3: tokenizer.json's post-processor prepends <|begin_of_text|>
            first = self._markup.encode("", add_special_tokens=True).ids[:1]
            add_bos = self.bos_id is not None and first == [self.bos_id]
        self.add_bos: bool = bool(add_bos)
        self._compiled = None  # (source, jinja template) cache

    def _require(self, token: str, what: str) -> int:
        token_id = self._markup.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{what} {token!r} is not in the tokenizer's vocabulary")
        return token_id

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying `tokenizers.Tokenizer` (special tokens in input text are NOT parsed)."""
        return self._text

    def __len__(self) -> int:
        return self._text.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token(self) -> str:
        return self._text.id_to_token(self.eos_id)

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_id is None else self._text.id_to_token(self.bos_id)

    @property
    def pad_token(self) -> str:
        return self._text.id_to_token(self.pad_id)

    # -- encoding -------------------------------------------------------------------------------

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text`; special-token strings inside it are encoded as ordinary text."""
        ids = self._text.encode(text, add_special_tokens=False).ids
        return self._wrap(ids, bos, eos)

    def encode_batch(self, texts: Sequence[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
        """`encode` for many texts at once (parallel in the Rust backend)."""
        return [self._wrap(e.ids, bos, eos) for e in self._text.encode_batch(list(texts), add_special_tokens=False)]

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        if bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if eos:
            ids = ids + [self.eos_id]
        return ids

    def encode_markup(self, text: str) -> list[int]:
        """Encode trusted text (a template, a prompt format) in which special-token strings ARE parsed."""
        return self._markup.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special: bool = True) -> str:
        if hasattr(ids, "tolist"):  # a tensor or numpy array
            ids = ids.tolist()
        return self._text.decode(list(ids), skip_special_tokens=skip_special)

    def token_id(self, token: str) -> int:
        """Id of a token (a special or added token, or any vocabulary entry) by its text."""
        token_id = self._markup.token_to_id(token)
        if token_id is None:
            raise KeyError(f"token {token!r} is not in the vocabulary (add it with add_special_tokens)")
        return token_id

    def add_special_tokens(self, tokens: list[str]) -> list[int]:
        """Add special tokens (kept whole in templates, never parsed from data text); return their ids.

        Tokens already present keep their id. The model's embedding must grow to `len(tokenizer)`
        (posttrain.models.resize.resize_token_embeddings).
        """
        added = [AddedToken(t, special=True, normalized=False) for t in tokens]
        for backend in (self._text, self._markup):
            backend.add_special_tokens(added)
        return [self.token_id(t) for t in tokens]

    def __getstate__(self) -> dict:
        # A compiled jinja Template can be neither copied nor pickled: drop it, it is rebuilt on use.
        return {**self.__dict__, "_compiled": None}

    # -- chat templates -------------------------------------------------------------------------

    def _template(self):
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template: pick a prompt style (alpaca, chatml, ...) "
                             "or set tokenizer.chat_template")
        if self._compiled is None or self._compiled[0] != self.chat_template:
            self._compiled = (self.chat_template, compile_chat_template(self.chat_template))
        return self._compiled[1]

    def render_chat_text(self, messages: list[dict], add_generation_prompt: bool = False, **kwargs) -> str:
        """The chat template rendered to a string, as transformers' apply_chat_template(tokenize=False)."""
        return self._template().render(messages=messages, add_generation_prompt=add_generation_prompt,
                                       **self._template_vars(), **kwargs)

    def _template_vars(self) -> dict:
        return dict(bos_token=self.bos_token or "", eos_token=self.eos_token, pad_token=self.pad_token)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False, **kwargs
                    ) -> tuple[list[int], list[bool]]:
        """Render `messages` with the chat template into (ids, trainable).

        Template text may contain special tokens; message contents are encoded as ordinary text.
        trainable is True for the tokens of assistant contents and for the template tokens after
        each assistant content up to and including the first end-of-turn token (a stop id).
        """
        nonce = secrets.token_hex(6)
        masked, contents = [], []
        for i, message in enumerate(messages):
            content = message.get("content")
            if isinstance(content, str):
                masked.append({**message, "content": f"@@{nonce}:{i}@@"})
            else:
                masked.append(message)
            contents.append(content)
        rendered = self.render_chat_text(masked, add_generation_prompt, **kwargs)
        pieces = re.split(f"@@{nonce}:(\\d+)@@", rendered)  # text, index, text, index, ..., text
        # Templates may transform contents (Llama 3 trims them): insert what the template would.
        full = self.render_chat_text(messages, add_generation_prompt, **kwargs)
        insert = _choose_content_form(pieces, contents, full)

        ids: list[int] = []
        trainable: list[bool] = []
        stops = set(self.stop_ids)
        after_assistant = False
        for k, piece in enumerate(pieces):
            if k % 2 == 1:  # a message content
                index = int(piece)
                piece_ids = self.encode(insert(index))
                after_assistant = messages[index].get("role") == "assistant"
                ids += piece_ids
                trainable += [after_assistant] * len(piece_ids)
                continue
            piece_ids = self.encode_markup(piece)
            flags = [False] * len(piece_ids)
            if after_assistant:  # train the end-of-turn token(s) that close the assistant turn
                for j, token in enumerate(piece_ids):
                    flags[j] = True
                    if token in stops:
                        break
                else:
                    flags = [False] * len(piece_ids)  # no end-of-turn token here: train nothing extra
            ids += piece_ids
            trainable += flags
            after_assistant = False
        return ids, trainable

    # -- persistence ----------------------------------------------------------------------------

    def save(self, directory) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json (Hugging Face layout)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        backend = tokenizers.Tokenizer.from_str(self._markup.to_str())
        backend.save(str(directory / "tokenizer.json"))
        special = {"eos_token": self.eos_token, "pad_token": self.pad_token}
        if self.bos_id is not None:
            special["bos_token"] = self.bos_token
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special,
            "add_bos_token": self.add_bos,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000_000,
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def from_dir(cls, directory) -> "Tokenizer":
        """From a Hugging Face directory: tokenizer.json (or vocab.json + merges.txt for GPT-2 style
        repos), special tokens from tokenizer_config.json, falling back to config.json's ids."""
        directory = Path(directory)
        if (directory / "tokenizer.json").exists():
            try:
                backend = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
            except Exception as e:
                raise ValueError(f"{directory / 'tokenizer.json'}: not a valid tokenizers file ({e})") from e
        elif (directory / "vocab.json").exists() and (directory / "merges.txt").exists():
            backend = _byte_level_bpe(directory / "vocab.json", directory / "merges.txt")
        else:
            raise FileNotFoundError(f"no tokenizer.json (nor vocab.json + merges.txt) in {directory}")
        tok_config = _read_json(directory / "tokenizer_config.json")
        model_config = _read_json(directory / "config.json")
        generation = _read_json(directory / "generation_config.json")

        def by_id(token_id):
            if isinstance(token_id, list):
                token_id = token_id[0] if token_id else None
            return backend.id_to_token(token_id) if isinstance(token_id, int) else None

        eos = _token_text(tok_config.get("eos_token")) or by_id(generation.get("eos_token_id")) \
            or by_id(model_config.get("eos_token_id"))
        bos = _token_text(tok_config.get("bos_token")) or by_id(generation.get("bos_token_id")) \
            or by_id(model_config.get("bos_token_id"))
        pad = _token_text(tok_config.get("pad_token")) or by_id(generation.get("pad_token_id"))
        if eos is None and backend.token_to_id("<|endoftext|>") is not None:
            eos = "<|endoftext|>"
        if eos is None:
            raise ValueError(f"{directory}: no eos_token in tokenizer_config.json and no eos_token_id in "
                             "config.json / generation_config.json; add one")
        stop_ids = generation.get("eos_token_id", model_config.get("eos_token_id"))
        stop_ids = stop_ids if isinstance(stop_ids, list) else [stop_ids]
        stops = [by_id(i) for i in stop_ids if isinstance(i, int)]
        template = None
        if (directory / "chat_template.jinja").exists():  # transformers >= 4.50 writes it here
            template = (directory / "chat_template.jinja").read_text()
        elif (directory / "chat_template.json").exists():
            template = _read_json(directory / "chat_template.json").get("chat_template")
        else:
            template = tok_config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named = {t["name"]: t["template"] for t in template}
            template = named.get("default", next(iter(named.values()), None))
        add_bos = tok_config.get("add_bos_token")
        return cls(backend, eos_token=eos, bos_token=bos, pad_token=pad, chat_template=template,
                   stop_tokens=[s for s in stops if s], add_bos=add_bos)

    @classmethod
    def from_gguf(cls, path) -> "Tokenizer":
        """From a GGUF file's tokenizer.ggml.* metadata, converted by transformers' GGUF builder."""
        from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer

        try:
            architecture, tokenizer_dict, tok_config = get_gguf_tokenizer(str(path))
            backend, _ = convert_gguf_tokenizer(architecture, tokenizer_dict)
        except Exception as e:
            raise ValueError(f"{path}: cannot build a tokenizer from this GGUF file's metadata ({e})") from e
        if tokenizer_dict.get("pre_tokenizer_type") == "smollm":
            # llama.cpp's "smollm" pre-tokenizer splits digits one by one, like SmolLM's tokenizer.json;
            # transformers' builder falls back to plain GPT-2 splitting for it.
            backend.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Digits(individual_digits=True), backend.pre_tokenizer])
        eos = tok_config.get("eos_token")
        if eos is None:
            raise ValueError(f"{path}: the GGUF metadata has no tokenizer.ggml.eos_token_id")
        return cls(backend, eos_token=eos, bos_token=tok_config.get("bos_token"),
                   pad_token=tok_config.get("pad_token"), chat_template=tok_config.get("chat_template"),
                   add_bos=tok_config.get("add_bos_token", False))


# -- constructors --------------------------------------------------------------------------------

def _byte_level_bpe(vocab_file, merges_file) -> tokenizers.Tokenizer:
    """GPT-2's byte-level BPE from its vocabulary (encoder.json / vocab.json) and merges (vocab.bpe)."""
    backend = tokenizers.Tokenizer(models.BPE.from_file(str(vocab_file), str(merges_file)))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    if backend.token_to_id("<|endoftext|>") is not None:
        backend.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    return backend


def gpt2_tokenizer_from_files(encoder_json, vocab_bpe) -> Tokenizer:
    """The GPT-2 tokenizer from OpenAI's encoder.json and vocab.bpe ("Hello, world" -> [15496, 11, 995]).

    (transformers 5's GPT2TokenizerFast(vocab_file=, merges_file=) silently builds an empty
    tokenizer, hence tokenizers' BPE.from_file.)
    """
    backend = _byte_level_bpe(encoder_json, vocab_bpe)
    return Tokenizer(backend, eos_token="<|endoftext|>", bos_token="<|endoftext|>", add_bos=False)


def load_tokenizer(name_or_path: str) -> Tokenizer:
    """Tokenizer for a preset alias, hub id, local Hugging Face directory, run directory or .gguf file."""
    from posttrain.weights.hub import resolve

    source = resolve(name_or_path, weights=False)
    if source.kind == "gguf":
        return Tokenizer.from_gguf(source.path)
    return Tokenizer.from_dir(source.path)


# -- helpers -------------------------------------------------------------------------------------

def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from e


def _token_text(token) -> str | None:
    """A special token from tokenizer_config.json: a string or a serialized AddedToken dict."""
    if isinstance(token, dict):
        return token.get("content")
    return token if isinstance(token, str) else None


def _choose_content_form(pieces: list[str], contents: list, full: str):
    """How the template shows each content: as given, or stripped (templates that `| trim` it).

    Compares the sentinel render with contents put back against a render with the real contents.
    """
    def rebuild(form):
        return "".join(form(int(p)) if k % 2 else p for k, p in enumerate(pieces))

    def raw(i):
        return contents[i]

    def stripped(i):
        return contents[i].strip()

    if rebuild(raw) == full:
        return raw
    if rebuild(stripped) == full:
        return stripped
    return raw  # the template rewrites contents in some other way: keep them as given


def compile_chat_template(source: str):
    """A jinja2 template in transformers' sandboxed environment (trim_blocks, lstrip_blocks,
    loop controls, `raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII text,
    and `{% generation %}` blocks rendered as plain text)."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        # transformers' AssistantTracker marks assistant text with {% generation %}; we derive
        # trainable tokens from roles instead, so the block only renders its body.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body, lineno=lineno)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)
