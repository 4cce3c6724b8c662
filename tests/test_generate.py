"""Generation: KV cache against full recomputation and transformers, batching, sampling, stops, streaming."""

import copy
import io

import pytest
import torch
from transformers import GPT2Config as HFGPT2Config
from transformers import GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM
from transformers import LlamaConfig as HFLlamaConfig
from transformers import Qwen2Config as HFQwen2Config

from posttrain.chat import chat_command, chat_loop, fit_to_context
from posttrain.generate import (
    BatchGeneration,
    GenerationConfig,
    IncrementalDecoder,
    filter_logits,
    generate,
    generate_batch,
    generate_command,
    generate_stream,
    generate_text,
    render_prompt,
    reply_stops,
)
from posttrain.models.gpt2 import CONV1D_SUFFIXES, GPT2Config
from posttrain.models.llama import LlamaConfig
from posttrain.models.registry import build_model
from posttrain.weights import save_pretrained

VOCAB = 50257  # the real GPT-2 tokenizer, so that text, stop strings and streaming are real
FAMILIES = ["gpt2", "llama", "qwen2"]
PROMPTS = ["Hello, world", "The quick brown fox jumps over the lazy dog and", "a", "Once upon a time"]


@pytest.fixture
def tokenizer(gpt2_tokenizer):
    return gpt2_tokenizer


def tiny_model(family: str, n_positions: int = 128, eos: int | list[int] = 50256):
    """A 2-layer, 64-dim model whose weights are scaled up so that greedy text is varied, not one token."""
    torch.manual_seed(0)
    if family == "gpt2":
        config = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=n_positions, vocab_size=VOCAB,
                            eos_token_id=eos)
    else:
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=n_positions,
                             bos_token_id=50256, eos_token_id=eos, model_type=family)
    model = build_model(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(8.0)
            elif family == "qwen2" and name.endswith(".bias"):
                p.normal_()  # Qwen2's q/k/v biases start at zero: make them count
    return model.eval()


def to_transformers(model):
    """The same weights in transformers' GPT2LMHeadModel / LlamaForCausalLM."""
    if isinstance(model.config, GPT2Config):
        hf = GPT2LMHeadModel(HFGPT2Config(**model.config.to_hf()))
        state = {k: v.t() if k.endswith(CONV1D_SUFFIXES) else v for k, v in model.state_dict().items()}
    elif model.config.model_type == "qwen2":
        hf = Qwen2ForCausalLM(HFQwen2Config(**model.config.to_hf()))
        state = model.state_dict()
    else:
        hf = LlamaForCausalLM(HFLlamaConfig(**model.config.to_hf()))
        state = model.state_dict()
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith(("attn.bias", "attn.masked_bias")) for k in missing), missing
    return hf.eval()


def greedy_without_cache(model, prompt: list[int], steps: int, stop: set[int]) -> list[int]:
    """Reference decoding: the whole sequence through the model at every step, no cache, no padding."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            token = model(torch.tensor([ids]))[0, -1].argmax().item()
            if token in stop:
                break
            ids.append(token)
    return ids[len(prompt):]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_with_cache_equals_full_recompute(family, tokenizer):
    model = tiny_model(family)
    prompt = tokenizer.encode(PROMPTS[1])
    out = generate(model, tokenizer, [prompt], GenerationConfig(max_new_tokens=24))[0]
    assert len(out) == 24
    assert len(set(out)) > 4  # the test model must not be degenerate, or the comparison proves little
    assert out == greedy_without_cache(model, prompt, 24, {tokenizer.eos_id})


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_transformers_generate(family, use_cache, tokenizer):
    """Our cached greedy decoding against transformers' generate, with and without its KV cache."""
    model = tiny_model(family)
    hf = to_transformers(model)
    for text in PROMPTS[:2]:
        prompt = tokenizer.encode(text)
        ours = generate(model, tokenizer, [prompt], GenerationConfig(max_new_tokens=20))[0]
        assert len(set(ours)) > 4  # varied text, or token identity would prove little
        with torch.no_grad():
            theirs = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 max_new_tokens=20, do_sample=False, eos_token_id=tokenizer.eos_id,
                                 pad_token_id=tokenizer.eos_id, use_cache=use_cache)[0, len(prompt):].tolist()
        if tokenizer.eos_id in theirs:  # transformers keeps the EOS (and pads after it); we drop it
            theirs = theirs[:theirs.index(tokenizer.eos_id)]
        assert ours == theirs


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_prompts_of_different_lengths_equal_one_at_a_time(family, tokenizer):
    model = tiny_model(family)
    prompts = [tokenizer.encode(t) for t in PROMPTS]
    assert len({len(p) for p in prompts}) == len(prompts)  # left padding differs per row
    config = GenerationConfig(max_new_tokens=16)
    batched = generate(model, tokenizer, prompts, config)
    single = [generate(model, tokenizer, [p], config)[0] for p in prompts]
    assert batched == single
    # rows that finish early (small budgets, a stop id) leave the batch; the others must not notice
    configs = [GenerationConfig(max_new_tokens=n, temperature=t, seed=s, stop_ids=stop)
               for n, t, s, stop in [(3, 0.0, None, []), (16, 1.0, 7, []), (9, 0.0, None, [single[2][4]]),
                                     (16, 0.8, 11, [])]]
    batched = generate_batch(model, tokenizer, prompts, configs)
    for prompt, config, result in zip(prompts, configs, batched):
        assert result.ids == generate_batch(model, tokenizer, [prompt], [config])[0].ids
    assert [len(r.ids) for r in batched][0] == 3 and batched[0].finish_reason == "length"
    assert batched[2].ids == single[2][:single[2].index(single[2][4])] and batched[2].finish_reason == "stop"


@pytest.mark.parametrize("family", FAMILIES)
def test_rows_that_join_a_running_batch_get_the_tokens_they_would_get_alone(family, tokenizer):
    """Continuous batching: prompts admitted while others decode (longer than the running rows' filled
    slots, which widens the cache, and shorter; greedy and seeded sampling) continue exactly as they
    would alone, and the running rows do not notice them."""
    model = tiny_model(family)
    prompts = [tokenizer.encode(t) for t in PROMPTS]  # 3, 11, 1 and 4 tokens
    configs = [GenerationConfig(max_new_tokens=12), GenerationConfig(max_new_tokens=6),
               GenerationConfig(max_new_tokens=10, temperature=1.0, seed=5), GenerationConfig(max_new_tokens=8)]
    alone = [generate_batch(model, tokenizer, [p], [c])[0].ids for p, c in zip(prompts, configs)]
    widened = []
    # running: "a" and "Hello, world" (3 slots, then 4 after a step); the 11-token prompt joins at the
    # second step and shifts them right by 7; the 4-token one joins at the fourth; at most 3 rows at once
    joining, calls = {2: [(prompts[1], configs[1], True)], 4: [(prompts[3], configs[3], False)]}, []

    def admit(free: int) -> list:
        calls.append(free)
        return joining.pop(len(calls), [])

    run = BatchGeneration(model, tokenizer, [prompts[2], prompts[0]], [configs[2], configs[0]], admit=admit,
                          max_rows=3)
    pieces = "".join(piece for row, piece in run if row == 2)  # row 2: the long joining prompt, streamed
    assert [r.ids for r in run.results] == [alone[2], alone[0], alone[1], alone[3]]
    assert pieces == run.results[2].text
    assert not joining and calls[:2] == [1, 1] and all(1 <= free <= 3 for free in calls)


def test_sampling_with_a_seed_repeats_and_seeds_differ(tokenizer):
    model = tiny_model("gpt2")
    prompts = [tokenizer.encode(PROMPTS[0])] * 2
    config = GenerationConfig(max_new_tokens=20, temperature=1.0, seed=123)
    first = generate(model, tokenizer, prompts, config)
    assert first == generate(model, tokenizer, prompts, config)
    assert first[0] != first[1]  # row i is seeded with seed + i: two samples of one prompt differ
    assert first[0] != generate(model, tokenizer, prompts[:1], GenerationConfig(max_new_tokens=20, temperature=1.0,
                                                                             seed=124))[0]
    assert first[1] == generate(model, tokenizer, prompts[:1], GenerationConfig(max_new_tokens=20, temperature=1.0,
                                                                             seed=124))[0]


def test_top_k_one_and_tiny_top_p_equal_greedy(tokenizer):
    model = tiny_model("llama")
    prompts = [tokenizer.encode(t) for t in PROMPTS[:3]]
    greedy = generate(model, tokenizer, prompts, GenerationConfig(max_new_tokens=16))
    assert generate(model, tokenizer, prompts, GenerationConfig(max_new_tokens=16, temperature=1.5, top_k=1,
                                                                seed=0)) == greedy
    assert generate(model, tokenizer, prompts, GenerationConfig(max_new_tokens=16, temperature=1.5, top_p=1e-6,
                                                                seed=0)) == greedy
    assert generate(model, tokenizer, prompts, GenerationConfig(max_new_tokens=16, temperature=1.5,
                                                                seed=0)) != greedy


def test_filter_logits_by_hand():
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0], [3.0, 1.0, 2.0, 0.0]]).log_softmax(-1)
    # row 0: top-2 keeps tokens 0 and 2; row 1: probs are .64 .09 .24 .03: top-p .8 keeps 0 and 2 (.64 < .8)
    out = filter_logits(logits, torch.tensor([2, 4]), torch.tensor([1.0, 0.8]))
    inf = float("-inf")
    assert out[0].tolist() == [logits[0, 0].item(), inf, logits[0, 2].item(), inf]
    assert out[1].tolist() == [logits[1, 0].item(), inf, logits[1, 2].item(), inf]
    # top-p .5: the top token alone holds .64 >= .5
    out = filter_logits(logits[:1], torch.tensor([4]), torch.tensor([0.5]))
    assert out[0].isfinite().tolist() == [True, False, False, False]


def test_stop_strings_cut_the_text_and_the_tokens(tokenizer):
    model = tiny_model("gpt2")
    prompt = tokenizer.encode(PROMPTS[3])
    full = generate_batch(model, tokenizer, [prompt], [GenerationConfig(max_new_tokens=30)])[0]
    assert full.finish_reason == "length" and full.completion_tokens == 30
    stop = full.text[len(full.text) // 2:len(full.text) // 2 + 3]  # a string that straddles tokens
    cut = full.text.index(stop)
    result = generate_batch(model, tokenizer, [prompt], [GenerationConfig(max_new_tokens=30,
                                                                          stop_strings=["zzzz", stop])])[0]
    assert result.finish_reason == "stop"
    assert result.text == full.text[:cut]
    assert stop not in tokenizer.decode(result.ids)
    assert full.text[:cut].startswith(tokenizer.decode(result.ids))
    assert result.ids == full.ids[:len(result.ids)]
    assert generate_text(model, tokenizer, [prompt], GenerationConfig(max_new_tokens=30, stop_strings=[stop])) \
        == [full.text[:cut]]


def test_eos_from_the_model_config_stops(tokenizer):
    prompt = tokenizer.encode(PROMPTS[0])
    free = generate(tiny_model("llama"), tokenizer, [prompt], GenerationConfig(max_new_tokens=12))[0]
    eos = free[5]
    stopped = generate_batch(tiny_model("llama", eos=[50256, eos]), tokenizer, [prompt],
                             [GenerationConfig(max_new_tokens=12)])[0]
    assert stopped.ids == free[:free.index(eos)]
    assert stopped.finish_reason == "stop" and stopped.completion_tokens == len(stopped.ids) + 1


def test_generation_stops_at_the_context_length(tokenizer):
    model = tiny_model("gpt2", n_positions=32)
    prompt = tokenizer.encode(" ".join(str(i) for i in range(25)))
    assert 20 < len(prompt) < 32
    result = generate_batch(model, tokenizer, [prompt], [GenerationConfig(max_new_tokens=50)])[0]
    assert len(result.ids) == 32 - len(prompt) and result.finish_reason == "length"
    with pytest.raises(ValueError, match="context"):
        generate(model, tokenizer, [prompt * 2], GenerationConfig(max_new_tokens=1))


@pytest.mark.parametrize("stops", [[], ["zzzz"], None])
def test_streamed_pieces_join_to_the_full_text(stops, tokenizer):
    model = tiny_model("gpt2")
    prompt = tokenizer.encode(PROMPTS[2])
    full = generate_text(model, tokenizer, [prompt], GenerationConfig(max_new_tokens=25))[0]
    if stops is None:  # a real stop string in the middle of the text
        stops = [full[len(full) // 2:len(full) // 2 + 4]]
    expected = full[:full.index(stops[0])] if stops and stops[0] in full else full
    pieces = list(generate_stream(model, tokenizer, prompt, GenerationConfig(max_new_tokens=25,
                                                                             stop_strings=stops)))
    assert len(pieces) > 2
    assert "".join(pieces) == expected


def test_incremental_decoding_never_splits_a_character(tokenizer):
    text = "naïve café — 日本語 🎉🐍 done"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text.split())  # multi-byte characters span several byte-level tokens
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids]
    pieces.append(decoder.flush())
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces  # some token completed no character on its own


def test_streaming_with_a_client_cancel_stops_the_row(tokenizer):
    model = tiny_model("gpt2")
    run = BatchGeneration(model, tokenizer, [tokenizer.encode(t) for t in PROMPTS[:2]],
                          [GenerationConfig(max_new_tokens=40)] * 2, stream=True)
    for row, _ in run:
        run.cancel(0)
    assert run.results[0].finish_reason == "cancelled" and len(run.results[0].ids) < 40
    assert run.results[1].finish_reason == "length" and len(run.results[1].ids) == 40


def test_training_flag_is_restored_and_no_grad_leaks(tokenizer):
    model = tiny_model("gpt2").train()
    generate(model, tokenizer, [tokenizer.encode("hi")], GenerationConfig(max_new_tokens=3))
    assert model.training
    assert torch.is_grad_enabled()


def test_render_prompt_uses_a_style_when_given(tokenizer):
    class Upper:
        def render(self, messages, add_generation_prompt=True):
            return tokenizer.encode("".join(m["content"].upper() for m in messages) + ":"), None

    assert render_prompt(tokenizer, [{"role": "user", "content": "hi"}], Upper()) == tokenizer.encode("HI:")


TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture
def chat_tokenizer(gpt2_tokenizer):
    """GPT-2's tokenizer with a plain-text chat template (a copy: the session fixture stays as it is)."""
    tokenizer = copy.copy(gpt2_tokenizer)
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def test_chat_loop_keeps_the_conversation_and_resets(chat_tokenizer):
    tok = chat_tokenizer
    model = tiny_model("gpt2")
    config = GenerationConfig(max_new_tokens=6)
    lines = iter(["hello", "again", "/reset", "third", "/exit", "never read"])
    out = io.StringIO()
    final = chat_loop(model, tok, config, system="Be nice.", read=lambda _: next(lines), out=out)

    def reply(messages):
        return generate_text(model, tok, [render_prompt(tok, messages)], config)[0]

    system = {"role": "system", "content": "Be nice."}
    r1 = reply([system, {"role": "user", "content": "hello"}])
    r2 = reply([system, {"role": "user", "content": "hello"}, {"role": "assistant", "content": r1},
                {"role": "user", "content": "again"}])
    r3 = reply([system, {"role": "user", "content": "third"}])
    assert r2 != reply([system, {"role": "user", "content": "again"}])  # the history mattered
    assert final == [system, {"role": "user", "content": "third"}, {"role": "assistant", "content": r3}]
    assert out.getvalue() == f"{r1}\n{r2}\n(new conversation)\n{r3}\n"


def test_chat_drops_the_oldest_exchanges_when_the_context_is_full(chat_tokenizer):
    tok = chat_tokenizer
    system = {"role": "system", "content": "S"}
    long = " ".join(["word"] * 20)
    messages = [system] + [{"role": r, "content": f"{i} {long}"} for i in range(3) for r in ("user", "assistant")]
    messages.append({"role": "user", "content": "last"})
    kept, prompt, budget = fit_to_context(tok, messages, None, context=100, max_new_tokens=16)
    assert kept[0] == system and kept[-1]["content"] == "last"
    assert len(kept) < len(messages) and kept[1]["role"] == "user"
    assert prompt == render_prompt(tok, kept) and len(prompt) + budget <= 100 and budget == 16
    with pytest.raises(ValueError, match="context"):
        fit_to_context(tok, [{"role": "user", "content": long * 10}], None, context=100, max_new_tokens=16)


def test_generate_command_streams_the_completion(tmp_path, capsys, chat_tokenizer):
    model = tiny_model("gpt2")
    directory = save_pretrained(model, chat_tokenizer, tmp_path / "model")
    expected = generate_text(model, chat_tokenizer, [chat_tokenizer.encode("Hello")], GenerationConfig(max_new_tokens=7))
    generate_command(str(directory), "Hello", max_new_tokens=7)
    assert capsys.readouterr().out == "Hello" + expected[0] + "\n"
    messages = [{"role": "user", "content": "Hello"}]
    expected = generate_text(model, chat_tokenizer, [render_prompt(chat_tokenizer, messages)],
                             GenerationConfig(max_new_tokens=7))
    generate_command(str(directory), "Hello", max_new_tokens=7, chat=True)
    assert capsys.readouterr().out == expected[0] + "\n"


def test_prompt_ids_outside_the_vocabulary_are_refused(tokenizer):
    model = tiny_model("gpt2")
    with pytest.raises(ValueError, match=r"prompt 1 holds token ids \[50257\] outside the model's vocabulary"):
        generate(model, tokenizer, [[1, 2], [3, 50257]], GenerationConfig(max_new_tokens=2))


def test_chat_and_generate_commands_with_a_style_that_adds_tokens(tmp_path, capsys, monkeypatch, gpt2_tokenizer):
    """chatml on GPT-2 adds <|im_start|>/<|im_end|> to the tokenizer: the model's embeddings must grow
    (to a multiple of 64) before the prompt reaches it."""
    from posttrain.prompts import get_style, resize_model_for_tokenizer
    from posttrain.weights import load

    directory = save_pretrained(tiny_model("gpt2"), gpt2_tokenizer, tmp_path / "model")
    model, tok = load(str(directory))
    style = get_style("chatml", tok)
    assert resize_model_for_tokenizer(model, tok) and model.config.vocab_size == 50304
    messages = [{"role": "user", "content": "hello"}]
    stop_strings, stop_ids = reply_stops(tok, style)
    reply = generate_text(model, tok, [render_prompt(tok, messages, style)],
                          GenerationConfig(max_new_tokens=6, stop_strings=stop_strings, stop_ids=stop_ids))[0]
    assert reply

    generate_command(str(directory), "hello", max_new_tokens=6, chat=True, style="chatml")
    assert capsys.readouterr().out == reply + "\n"
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/exit\n"))
    chat_command(str(directory), style="chatml", temperature=0.0, max_new_tokens=6)
    assert reply + "\n" in capsys.readouterr().out


def test_real_smollm2_answers_paris_batched_or_alone(smollm2):
    model, tokenizer = smollm2
    questions = ["What is the capital of France?", "Name three primary colours, please."]
    prompts = [render_prompt(tokenizer, [{"role": "user", "content": q}]) for q in questions]
    stop_strings, stop_ids = reply_stops(tokenizer)
    config = GenerationConfig(max_new_tokens=24, stop_strings=stop_strings, stop_ids=stop_ids)
    batched = generate_batch(model, tokenizer, prompts, [config] * 2)
    assert "Paris" in batched[0].text
    assert batched[0].finish_reason == "stop"  # ended by <|im_end|>, which is not in the text
    assert "<|im_end|>" not in batched[0].text and tokenizer.token_id("<|im_end|>") not in batched[0].ids
    alone = generate_batch(model, tokenizer, prompts[1:], [config])[0]
    assert alone.ids == batched[1].ids
