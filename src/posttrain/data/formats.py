"""Records -> messages with roles, preference triples, or plain text.

Every instruction format becomes a list of messages `{"role": "system"|"user"|"assistant",
"content": str}`; a prompt style (posttrain.prompts) renders those into tokens. Formats:

- Alpaca: `instruction`, optional `input`, `output`. The user message's content is the
  instruction and input joined by a blank line (what chat styles show); it also keeps the two
  fields (`"instruction"`, `"input"` keys) so that the `alpaca` style renders the original
  template exactly.
- Chat: `messages` (or ShareGPT's `conversations` with `from`/`value`), multi-turn, optional
  system message first.
- Prompt/completion: `prompt`, `completion` -> one user and one assistant message.
- Text: `text` (or a .txt file): continued pre-training, see posttrain.data.tokenize.text_blocks.
- Preference triples for DPO: (prompt messages, chosen, rejected) from
  instruction/input/chosen/rejected, prompt/chosen/rejected, or messages/chosen/rejected.

Invalid records raise DataError naming the record (file, index, line), or with
`skip_invalid=True` are skipped and counted by reason.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from posttrain.data.sources import DataError, Record

ROLES = ("system", "user", "assistant")
# ShareGPT and other dumps name roles differently.
_ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}

Messages = list[dict]


@dataclass
class Preference:
    """A DPO example: the prompt's messages and two alternative assistant replies."""
    prompt: Messages
    chosen: Messages
    rejected: Messages


@dataclass
class FormatStats:
    """What happened to the records: how many became examples, and why the rest did not."""
    records: int = 0
    examples: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count (skip_invalid only)
    identical_pairs: int = 0  # preference pairs dropped because chosen == rejected

    def summary(self) -> str:
        parts = [f"{self.examples} examples from {self.records} records"]
        if self.skipped:
            parts.append(f"skipped {sum(self.skipped.values())} invalid: " +
                         ", ".join(f"{r} ({n})" for r, n in self.skipped.most_common()))
        if self.identical_pairs:
            parts.append(f"dropped {self.identical_pairs} pairs with chosen == rejected")
        return "; ".join(parts)


class InvalidRecord(DataError):
    """A record that does not fit its format; `reason` is short and groups skipped records."""

    def __init__(self, record: Record, reason: str, detail: str = ""):
        self.reason = reason
        super().__init__(f"{record.where()}: {reason}{': ' + detail if detail else ''}. Fix the record, "
                         f"or pass skip_invalid=True to skip (and count) invalid records")


def detect_format(data: dict) -> str:
    """The format of one record by its keys: preference, chat, alpaca, prompt_completion or text."""
    if "chosen" in data and "rejected" in data:
        return "preference"
    if "messages" in data or "conversations" in data:
        return "chat"
    if "instruction" in data:
        return "alpaca"
    if "prompt" in data and "completion" in data:
        return "prompt_completion"
    if "text" in data:
        return "text"
    return "unknown"


# ----------------------------------------------------------------------------------------------
# Field checks

def _string(record: Record, key: str, allow_empty: bool = False, optional: bool = False) -> str:
    if key not in record.data or (optional and record.data[key] is None):
        if optional:
            return ""
        raise InvalidRecord(record, f"missing field '{key}'", f"it has {sorted(record.data)}")
    value = record.data[key]
    if not isinstance(value, str):
        raise InvalidRecord(record, f"field '{key}' is not a string", f"got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise InvalidRecord(record, f"empty '{key}'")
    return value


def _messages(record: Record, value, key: str) -> Messages:
    """Validated copies of a list of role/content messages (ShareGPT from/value accepted)."""
    if not isinstance(value, list) or not value:
        raise InvalidRecord(record, f"field '{key}' is not a non-empty list of messages",
                            f"got {type(value).__name__}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise InvalidRecord(record, f"{key}[{i}] is not an object", f"got {type(m).__name__}")
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        role = _ROLE_ALIASES.get(role, role)
        if role not in ROLES:
            raise InvalidRecord(record, f"{key}[{i}] has an unknown role", f"{role!r}; use one of {ROLES}")
        if not isinstance(content, str):
            raise InvalidRecord(record, f"{key}[{i}] content is not a string", f"got {type(content).__name__}")
        if role == "system" and i != 0:
            raise InvalidRecord(record, f"{key}[{i}] is a system message after the first message")
        if role == "assistant" and not content.strip():
            raise InvalidRecord(record, f"empty assistant message {key}[{i}]")
        out.append({"role": role, "content": content})
    return out


def _alpaca_user(instruction: str, input_text: str) -> dict:
    content = f"{instruction}\n\n{input_text}" if input_text.strip() else instruction
    return {"role": "user", "content": content, "instruction": instruction, "input": input_text}


# ----------------------------------------------------------------------------------------------
# Records -> messages

def to_messages(record: Record) -> Messages:
    """The messages of one instruction record (alpaca, chat or prompt/completion)."""
    kind = detect_format(record.data)
    if kind == "preference" and "instruction" in record.data and "output" in record.data:
        kind = "alpaca"  # an Alpaca record with added pairs: its output is the SFT target
    elif kind == "preference":  # otherwise an SFT run on preference data trains on the chosen reply
        pref = to_preference(record)
        return pref.prompt + pref.chosen
    if kind == "alpaca":
        instruction = _string(record, "instruction")
        input_text = _string(record, "input", allow_empty=True, optional=True)
        output = _string(record, "output")
        return [_alpaca_user(instruction, input_text), {"role": "assistant", "content": output}]
    if kind == "chat":
        key = "messages" if "messages" in record.data else "conversations"
        messages = _messages(record, record.data[key], key)
        if not any(m["role"] == "assistant" for m in messages):
            raise InvalidRecord(record, "no assistant message", "there is nothing to learn from")
        return messages
    if kind == "prompt_completion":
        prompt = _string(record, "prompt")
        completion = _string(record, "completion")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    if kind == "text":
        raise InvalidRecord(record, "a plain 'text' record", "text is for continued pre-training "
                            "(format='text'), not instruction tuning")
    raise InvalidRecord(record, "unknown record format", f"keys {sorted(record.data)}; expected "
                        "instruction/input/output, messages, prompt/completion or text")


def to_preference(record: Record) -> Preference:
    """The (prompt, chosen, rejected) triple of one preference record."""
    data = record.data
    if "instruction" in data:
        instruction = _string(record, "instruction")
        prompt = [_alpaca_user(instruction, _string(record, "input", allow_empty=True, optional=True))]
    elif "messages" in data:
        prompt = _messages(record, data["messages"], "messages")
    elif "prompt" in data:
        prompt = (_messages(record, data["prompt"], "prompt") if isinstance(data["prompt"], list)
                  else [{"role": "user", "content": _string(record, "prompt")}])
    else:
        raise InvalidRecord(record, "preference record without a prompt",
                            f"keys {sorted(data)}; expected instruction, prompt or messages")
    if prompt[-1]["role"] != "user":
        raise InvalidRecord(record, "preference prompt does not end with a user message")
    return Preference(prompt, _reply(record, "chosen"), _reply(record, "rejected"))


def _reply(record: Record, key: str) -> Messages:
    value = record.data.get(key)
    if isinstance(value, list):  # TRL's conversational form: [{"role": "assistant", ...}]
        messages = _messages(record, value, key)
        if any(m["role"] != "assistant" for m in messages):
            raise InvalidRecord(record, f"'{key}' holds a non-assistant message")
        return messages
    return [{"role": "assistant", "content": _string(record, key)}]


def _convert(records: list[Record], convert, skip_invalid: bool, stats: FormatStats) -> list:
    out = []
    for record in records:
        stats.records += 1
        try:
            out.append(convert(record))
        except InvalidRecord as e:
            if not skip_invalid:
                raise
            stats.skipped[e.reason] += 1
    return out


def _nothing_left(records: list[Record], stats: FormatStats, what: str) -> DataError:
    source = records[0].source if records else "the dataset"
    return DataError(f"{source}: no {what} left ({stats.summary()}); check the file's format")


def records_to_messages(records: list[Record], skip_invalid: bool = False
                        ) -> tuple[list[Messages], FormatStats]:
    """Every record's messages, and counts. Raises DataError when nothing is left."""
    stats = FormatStats()
    examples = _convert(records, to_messages, skip_invalid, stats)
    stats.examples = len(examples)
    if not examples:
        raise _nothing_left(records, stats, "instruction examples")
    return examples, stats


def records_to_preferences(records: list[Record], skip_invalid: bool = False
                           ) -> tuple[list[Preference], FormatStats]:
    """Every record's preference triple; pairs whose chosen equals rejected are dropped and counted."""
    stats = FormatStats()
    pairs = []
    for pref in _convert(records, to_preference, skip_invalid, stats):
        if [m["content"] for m in pref.chosen] == [m["content"] for m in pref.rejected]:
            stats.identical_pairs += 1  # no preference signal: DPO's loss is constant on these
            continue
        pairs.append(pref)
    stats.examples = len(pairs)
    if not pairs:
        raise _nothing_left(records, stats, "preference pairs")
    return pairs, stats


def records_to_texts(records: list[Record], skip_invalid: bool = False) -> tuple[list[str], FormatStats]:
    """The `text` field of every record (continued pre-training)."""
    stats = FormatStats()
    texts = _convert(records, lambda r: _string(r, "text"), skip_invalid, stats)
    stats.examples = len(texts)
    if not texts:
        raise _nothing_left(records, stats, "texts")
    return texts, stats


def dataset_kind(records: list[Record]) -> str:
    """`text` when the records are plain text, else `messages` (instruction data of any format)."""
    if records and all(detect_format(r.data) == "text" for r in records):
        return "text"
    return "messages"
