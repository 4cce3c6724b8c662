"""Prompt styles: messages -> token ids plus a per-token "trainable" flag.

A style lays a conversation out as segments of token ids, each marked as part of a response
(an assistant's content and the end-of-turn marker that closes it) or not. The trainable flags
come from those roles, never from searching strings in rendered text (torchtune's
`Message.masked`, litgpt's `PromptStyle`):

- `loss_on="response"`: only response segments are trainable (every assistant turn of a
  multi-turn chat, and the EOS / end-of-turn token after each).
- `loss_on="all"`: every token is trainable (the seed's default).

Message contents are always encoded as ordinary text (`tokenizer.encode`), so a dataset that
contains "<|endoftext|>" or "<|im_end|>" cannot forge a special token; special markers come
from `tokenizer.token_id`.

Styles (`get_style(name, tokenizer)`):

- `alpaca`: rasbt's LLMs-from-scratch / Stanford Alpaca template, then EOS. Multi-turn is
  an extension: every further user turn adds "\\n\\n### Instruction:\\n{user}\\n\\n### Response:\\n
  {assistant}" + EOS, and a system message replaces the "Below is an instruction..." preamble.
- `phi3`: `<|user|>\\n...<|end|>\\n<|assistant|>\\n...<|end|>\\n` (`<|end|>` ends a turn).
- `chatml`: `<|im_start|>role\\n...<|im_end|>\\n`; adds `<|im_start|>`/`<|im_end|>` as special
  tokens when the tokenizer lacks them (GPT-2: two new ids, call `resize_model_for_tokenizer`).
- `llama2`: `<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {assistant}</s>` per turn.
- `template`: the tokenizer's own chat template (`tokenizer.render_chat`).
- `plain`: contents concatenated with no markers, EOS after each assistant reply (raw
  prompt/completion data that carries its own separators).
- `auto`: `template` when the tokenizer has a chat template, else `alpaca`.

`render(messages, add_generation_prompt=True)` gives the prompt for generation (up to and
including the assistant header); `stop_strings`/`stop_ids` end the generated response.
"""

from __future__ import annotations

from typing import Iterator

LOSS_MODES = ("all", "response")
ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.")

Segment = tuple[list[int], bool]  # token ids, part of a response?


def special_id(tokenizer, token: str) -> int | None:
    """The id of `token` when the tokenizer has it as a single (special/added) token, else None."""
    try:
        return tokenizer.token_id(token)
    except (KeyError, ValueError, LookupError):
        return None


class PromptStyle:
    """Base class: subclasses lay messages out as segments (`_segments`)."""
    name = ""
    stop_strings: list[str] = []
    adds_bos = True  # prepend BOS when the tokenizer's model expects one (styles that place BOS say False)

    def __init__(self, tokenizer, loss_on: str = "all"):
        if loss_on not in LOSS_MODES:
            raise ValueError(f"loss_on must be one of {LOSS_MODES}, got {loss_on!r}")
        self.tokenizer = tokenizer
        self.loss_on = loss_on

    @property
    def stop_ids(self) -> list[int]:
        """Token ids that end a generated response."""
        return [self.tokenizer.eos_id]

    def render(self, messages: list[dict], add_generation_prompt: bool = False
               ) -> tuple[list[int], list[bool]]:
        """Token ids and trainable flags of a conversation (or of a prompt for generation)."""
        if not messages:
            raise ValueError("cannot render an empty conversation")
        ids: list[int] = []
        trainable: list[bool] = []
        if self.adds_bos and getattr(self.tokenizer, "add_bos", False) and self.tokenizer.bos_id is not None:
            # Models trained with BOS before every document (Llama 3) expect it here too.
            ids.append(self.tokenizer.bos_id)
            trainable.append(self.loss_on == "all")
        for seg_ids, is_response in self._segments(messages, add_generation_prompt):
            ids.extend(seg_ids)
            trainable.extend([is_response or self.loss_on == "all"] * len(seg_ids))
        return ids, trainable

    def _segments(self, messages: list[dict], add_generation_prompt: bool) -> Iterator[Segment]:
        raise NotImplementedError

    def _text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text) if text else []

    def _marker(self, token: str) -> list[int]:
        """A template marker: its special-token id when the tokenizer has one, else its text."""
        tid = special_id(self.tokenizer, token)
        return [tid] if tid is not None else self._text(token)


class Alpaca(PromptStyle):
    name = "alpaca"
    stop_strings = ["\n\n### Instruction:", "\n\n### Response:"]

    def _segments(self, messages, add_generation_prompt):
        system = messages[0]["content"] if messages[0]["role"] == "system" else None
        turns = messages[1:] if system is not None else messages
        prompt = system if system is not None else ALPACA_PREAMBLE
        for m in turns:
            if m["role"] == "user":
                instruction = m.get("instruction", m["content"])
                input_text = m.get("input", "")
                prompt += f"\n\n### Instruction:\n{instruction}"
                if input_text:  # rasbt's format_input leaves an empty Input section out
                    prompt += f"\n\n### Input:\n{input_text}"
                prompt += "\n\n### Response:\n"
            elif m["role"] == "assistant":
                if prompt:
                    yield self._text(prompt), False
                yield self._text(m["content"]), True
                yield [self.tokenizer.eos_id], True
                prompt = ""
            else:
                raise ValueError("alpaca style: a system message may only come first")
        if prompt:
            yield self._text(prompt), False


class Phi3(PromptStyle):
    name = "phi3"
    stop_strings = ["<|end|>"]

    @property
    def stop_ids(self):
        end = special_id(self.tokenizer, "<|end|>")
        return [self.tokenizer.eos_id] + ([end] if end is not None else [])

    def _segments(self, messages, add_generation_prompt):
        for m in messages:
            yield self._marker(f"<|{m['role']}|>") + self._text("\n"), False
            yield self._text(m["content"]) + self._marker("<|end|>"), m["role"] == "assistant"
            yield self._text("\n"), False
        if add_generation_prompt:
            yield self._marker("<|assistant|>") + self._text("\n"), False


class ChatML(PromptStyle):
    name = "chatml"
    stop_strings = ["<|im_end|>"]
    SPECIAL = ["<|im_start|>", "<|im_end|>"]

    def __init__(self, tokenizer, loss_on: str = "all"):
        super().__init__(tokenizer, loss_on)
        # ChatML's markers must be single special tokens; a tokenizer without them (GPT-2) gets
        # them added, and the model's embeddings must grow (resize_model_for_tokenizer).
        missing = [t for t in self.SPECIAL if special_id(tokenizer, t) is None]
        self.added_ids = tokenizer.add_special_tokens(missing) if missing else []
        self.im_start = tokenizer.token_id("<|im_start|>")
        self.im_end = tokenizer.token_id("<|im_end|>")

    @property
    def stop_ids(self):
        return [self.im_end] + ([self.tokenizer.eos_id] if self.tokenizer.eos_id != self.im_end else [])

    def _segments(self, messages, add_generation_prompt):
        for m in messages:
            yield [self.im_start] + self._text(f"{m['role']}\n"), False
            yield self._text(m["content"]) + [self.im_end], m["role"] == "assistant"
            yield self._text("\n"), False
        if add_generation_prompt:
            yield [self.im_start] + self._text("assistant\n"), False


class Llama2(PromptStyle):
    name = "llama2"
    stop_strings = ["[INST]"]
    adds_bos = False  # BOS opens every turn

    def _segments(self, messages, add_generation_prompt):
        system = messages[0]["content"] if messages[0]["role"] == "system" else None
        turns = messages[1:] if system is not None else messages
        bos = [self.tokenizer.bos_id] if self.tokenizer.bos_id is not None else []
        for i, m in enumerate(turns):
            expected = "user" if i % 2 == 0 else "assistant"
            if m["role"] != expected:
                raise ValueError(f"llama2 style needs alternating user/assistant turns after an "
                                 f"optional system message; turn {i} is {m['role']}")
            if m["role"] == "user":
                content = m["content"].strip()
                if i == 0 and system is not None:
                    content = f"<<SYS>>\n{system.strip()}\n<</SYS>>\n\n{content}"
                yield bos + self._text(f"[INST] {content} [/INST]"), False
            else:
                # The space after [/INST] belongs to the reply: BPE tokenizers merge it into the
                # first word, and generation then starts exactly where training did.
                yield self._text(" " + m["content"].strip()) + [self.tokenizer.eos_id], True


class Template(PromptStyle):
    name = "template"

    def __init__(self, tokenizer, loss_on: str = "all"):
        super().__init__(tokenizer, loss_on)
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("prompt style 'template': this tokenizer has no chat template; "
                             "choose alpaca, chatml, phi3 or llama2")

    @property
    def stop_ids(self):
        ids = list(getattr(self.tokenizer, "stop_ids", [self.tokenizer.eos_id]))
        for token in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<|end_of_text|>", "<|endoftext|>"):
            tid = special_id(self.tokenizer, token)
            if tid is not None and tid not in ids and token in self.tokenizer.chat_template:
                ids.append(tid)
        return ids

    def render(self, messages, add_generation_prompt=False):
        plain = [{"role": m["role"], "content": m["content"]} for m in messages]
        ids, response = self.tokenizer.render_chat(plain, add_generation_prompt=add_generation_prompt)
        return list(ids), [bool(r) or self.loss_on == "all" for r in response]


class Plain(PromptStyle):
    name = "plain"

    def _segments(self, messages, add_generation_prompt):
        for m in messages:
            if m["role"] == "assistant":
                yield self._text(m["content"]) + [self.tokenizer.eos_id], True
            else:
                yield self._text(m["content"]), False


STYLES: dict[str, type[PromptStyle]] = {
    cls.name: cls for cls in (Alpaca, Phi3, ChatML, Llama2, Template, Plain)}


def get_style(name: str, tokenizer, loss_on: str = "all") -> PromptStyle:
    """The prompt style `name` bound to a tokenizer (may add special tokens: see ChatML)."""
    if name == "auto":
        name = "template" if getattr(tokenizer, "chat_template", None) else "alpaca"
    if name not in STYLES:
        raise ValueError(f"unknown prompt style {name!r}; choose one of {sorted(STYLES) + ['auto']}")
    return STYLES[name](tokenizer, loss_on)


def resize_model_for_tokenizer(model, tokenizer, multiple_of: int = 64) -> bool:
    """Grow the model's embeddings (and head) when the tokenizer gained tokens (e.g. ChatML's).

    The new size is rounded up to a multiple of 64 (faster matmuls); new rows are initialised by
    models/resize.py. Returns whether the model changed.
    """
    if len(tokenizer) <= model.config.vocab_size:
        return False
    from posttrain.models.resize import resize_token_embeddings
    resize_token_embeddings(model, len(tokenizer), multiple_of=multiple_of)
    return True
