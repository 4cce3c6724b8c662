"""Interactive chat in the terminal: `posttrain chat MODEL`.

The conversation is kept as messages and rendered afresh every turn by generate.render_prompt
(the tokenizer's chat template, or a prompt style), so what the model sees is exactly what it
would see from the server or in training data. When the conversation outgrows the model's
context, the oldest exchanges are dropped (the system message stays).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import replace
from typing import TextIO

import torch.nn as nn

from posttrain.generate import (
    GenerationConfig,
    PromptStyle,
    generate_stream,
    load_for_inference,
    render_prompt,
    reply_stops,
    resolve_style,
)

HELP = "/reset starts a new conversation, /exit (or Ctrl-D) quits."


def fit_to_context(tokenizer, messages: list[dict], style: PromptStyle | None, context: int,
                   max_new_tokens: int) -> tuple[list[dict], list[int], int]:
    """(messages, prompt ids, token budget) that fit the context: drop the oldest exchanges first,
    then shrink the reply budget. Raises ValueError when even the last message alone is too long."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system):]
    while True:
        prompt = render_prompt(tokenizer, system + turns, style)
        room = context - len(prompt)
        if room >= max_new_tokens or len(turns) <= 1:
            break
        turns = turns[2:] if len(turns) > 2 else turns[-1:]  # drop the oldest user/assistant pair
    if room < 1:
        raise ValueError(f"this message makes a prompt of {len(prompt)} tokens; the model's context is "
                         f"{context}: write a shorter one")
    return system + turns, prompt, min(max_new_tokens, room)


def chat_loop(model: nn.Module, tokenizer, config: GenerationConfig, system: str | None = None,
              style: PromptStyle | None = None, read: Callable[[str], str] = input,
              out: TextIO | None = None) -> list[dict]:
    """Read user lines with `read` until /exit or EOF, streaming each reply to `out` (default: stdout).

    Returns the conversation as it stood at exit (for tests and callers that keep transcripts).
    """
    out = out or sys.stdout  # looked up per call: a stdout redirected after import is honoured
    stop_strings, stop_ids = reply_stops(tokenizer, style)
    config = replace(config, stop_strings=list(config.stop_strings) + stop_strings,
                     stop_ids=list(config.stop_ids) + stop_ids)
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    context = model.config.max_length
    turn = 0
    while True:
        try:
            line = read("> ")
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return messages
        text = line.strip()
        if text in ("/exit", "/quit"):
            return messages
        if text == "/reset":
            messages = list(start)
            out.write("(new conversation)\n")
            continue
        if text in ("/help", "/?"):
            out.write(HELP + "\n")
            continue
        if not text:
            continue
        try:
            kept, prompt, budget = fit_to_context(tokenizer, messages + [{"role": "user", "content": line}], style,
                                                  context, config.max_new_tokens)
        except ValueError as e:
            out.write(f"({e})\n")
            continue
        if len(kept) < len(messages) + 1:
            out.write("(the oldest messages no longer fit the context and were dropped)\n")
        # a different seed each turn, so that a seeded session is repeatable but turns differ
        seed = None if config.seed is None else config.seed + turn
        reply = []
        try:
            for piece in generate_stream(model, tokenizer, prompt, replace(config, max_new_tokens=budget, seed=seed)):
                reply.append(piece)
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:  # Ctrl-C stops this reply; the exchange is forgotten
            out.write("\n(interrupted)\n")
            continue
        out.write("\n")
        messages = kept + [{"role": "assistant", "content": "".join(reply)}]
        turn += 1


def chat_command(model: str, system: str | None = None, temperature: float = 0.7, top_p: float | None = 0.9,
                 top_k: int | None = None, max_new_tokens: int = 512, seed: int | None = None,
                 style: str | None = None, device: str | None = None, dtype: str | None = None) -> None:
    """Chat with a model in the terminal; /reset starts over, /exit quits.

    Args:
        model: preset alias, hub id, local Hugging Face directory, .gguf file or run directory.
        system: system message that opens the conversation.
        temperature: sampling temperature; 0 is greedy decoding.
        top_p: nucleus sampling: the smallest set of tokens holding this probability mass.
        top_k: sample among the k most likely tokens only.
        max_new_tokens: longest reply, in tokens.
        seed: random seed (a repeatable session).
        style: prompt style (alpaca, chatml, phi3, llama2, template, plain); default: the style a
            posttrain run trained the model with, else the tokenizer's chat template.
        device: cuda, cpu, ... (default: cuda when available).
        dtype: float32, bfloat16 or float16 (default: bfloat16 on CUDA, float32 on CPU).
    """
    net, tokenizer = load_for_inference(model, device, dtype)
    prompt_style = resolve_style(style, tokenizer, model, net)
    if prompt_style is None and getattr(tokenizer, "chat_template", None) is None:
        raise SystemExit(f"{model}: the tokenizer has no chat template; pick a prompt style with --style "
                         "(alpaca, chatml, phi3, llama2, plain)")
    config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                              seed=seed)
    print(f"chatting with {model}. {HELP}", flush=True)
    chat_loop(net, tokenizer, config, system=system, style=prompt_style)
