"""The OpenAI-compatible server, run for real (`posttrain serve` in a subprocess) and
spoken to with the official `openai` client: answers equal in-process generation."""

import copy
import json
import os
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from conftest import running_server
import torch

from posttrain.generate import GenerationConfig, encode_prompt, generate_batch, render_prompt, reply_stops
from posttrain.models.gpt2 import GPT2Config
from posttrain.models.registry import build_model
from posttrain.weights import load, save_pretrained

KEY = "sk-test-7f3a"
NAME = "tiny-gpt2"
CONTEXT = 96
TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture(scope="module")
def served(tmp_path_factory, gpt2_tokenizer):
    """(base url, model, tokenizer): a tiny GPT-2 saved in Hugging Face format, served by a subprocess,
    and the same files loaded here to compute the expected answers."""
    tokenizer = copy.copy(gpt2_tokenizer)  # the session fixture stays without a template
    tokenizer.chat_template = TEMPLATE
    torch.manual_seed(0)
    model = build_model(GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=CONTEXT))
    with torch.no_grad():  # larger weights: varied text rather than one repeated token
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    directory = save_pretrained(model, tokenizer, tmp_path_factory.mktemp("served") / "model")
    model, tokenizer = load(directory)

    env = {**os.environ, "POSTTRAIN_TEST_KEY": KEY}
    with running_server(directory, tmp_path_factory.mktemp("log"), "--name", NAME, "--api_key_env",
                        "POSTTRAIN_TEST_KEY", "--max_tokens_limit", "64", "--max_batch", "4",
                        "--max_body_bytes", "20000", env=env) as url:
        yield url, model, tokenizer


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def expected(model, tokenizer, prompt: list[int], **config) -> tuple[str, str, int]:
    result = generate_batch(model, tokenizer, [prompt], [GenerationConfig(**config)])[0]
    return result.text, ("length" if result.finish_reason == "length" else "stop"), result.completion_tokens


def test_models_lists_the_served_name(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME


def test_chat_completion_equals_local_generation(served, client):
    _, model, tokenizer = served
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    reply = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0)
    prompt = render_prompt(tokenizer, messages)
    stop_strings, stop_ids = reply_stops(tokenizer)
    text, reason, produced = expected(model, tokenizer, prompt, max_new_tokens=12, stop_strings=stop_strings,
                                      stop_ids=stop_ids)
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == text and text
    assert choice.finish_reason == reason
    assert reply.usage.prompt_tokens == len(prompt)
    assert reply.usage.completion_tokens == produced
    assert reply.usage.total_tokens == len(prompt) + produced
    assert reply.model == NAME and reply.id.startswith("chatcmpl-")


def test_completion_with_stop_equals_local_generation(served, client):
    _, model, tokenizer = served
    prompt_text = "The capital of France is"
    full = client.completions.create(model=NAME, prompt=prompt_text, max_tokens=20, temperature=0)
    text, reason, _ = expected(model, tokenizer, encode_prompt(tokenizer, prompt_text), max_new_tokens=20)
    assert full.choices[0].text == text and full.choices[0].finish_reason == reason == "length"
    assert full.usage.prompt_tokens == len(tokenizer.encode(prompt_text))
    stop = text[8:11]
    cut = client.completions.create(model=NAME, prompt=prompt_text, max_tokens=20, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[:text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_completion_prompt_may_be_token_ids_or_a_chat_prefix(served, client):
    _, model, tokenizer = served
    ids = tokenizer.encode("user: hello\nassistant:")
    by_ids = client.completions.create(model=NAME, prompt=ids, max_tokens=8, temperature=0)
    by_text = client.completions.create(model=NAME, prompt="user: hello\nassistant:", max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text == expected(model, tokenizer, ids, max_new_tokens=8)[0]
    # special-token strings in a completion prompt are parsed (Magpie sends template prefixes)
    special = client.completions.create(model=NAME, prompt="<|endoftext|>hi", max_tokens=4, temperature=0)
    assert special.usage.prompt_tokens == 2


def test_streaming_chat_and_completion_join_to_the_full_text(served, client):
    messages = [{"role": "user", "content": "Tell me a story about a fox."}]
    whole = client.chat.completions.create(model=NAME, messages=messages, max_tokens=30, temperature=0)
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=30, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 2
    assert "".join(pieces) == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    full = client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=25, temperature=0)
    stream = client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=25, temperature=0,
                                       stream=True)
    texts, reasons = zip(*[(c.choices[0].text, c.choices[0].finish_reason) for c in stream])
    assert "".join(texts) == full.choices[0].text and reasons[-1] == "length"


def test_raw_sse_format(served):
    url = served[0]
    body = {"model": NAME, "prompt": "Hi", "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = "".join(r.iter_text())
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events[:-1])
    assert json.loads(events[-3][len("data: "):])["choices"][0]["finish_reason"] == "length"


def test_seed_repeats_and_n_choices_differ(client):
    kwargs = dict(model=NAME, prompt="Random words:", max_tokens=12, temperature=1.0, seed=42)
    first = client.completions.create(**kwargs)
    assert first.choices[0].text == client.completions.create(**kwargs).choices[0].text
    several = client.completions.create(**kwargs, n=3)
    texts = [c.text for c in several.choices]
    assert texts[0] == first.choices[0].text  # choice i is seeded with seed + i
    assert len(set(texts)) == 3
    assert several.usage.completion_tokens == 36


def test_eight_concurrent_requests_are_all_answered_correctly(served, client):
    url, model, tokenizer = served
    prompts = [f"Request number {i} says" + " really" * i for i in range(8)]
    budgets = [4 + 3 * i for i in range(8)]

    def ask(i):  # odd requests stream: streamed and whole rows share batches
        kwargs = dict(model=NAME, prompt=prompts[i], max_tokens=budgets[i], temperature=0)
        if i % 2 == 0:
            reply = client.completions.create(**kwargs).choices[0]
            return reply.text, reply.finish_reason
        chunks = [c.choices[0] for c in client.completions.create(**kwargs, stream=True)]
        return "".join(c.text for c in chunks), chunks[-1].finish_reason

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(ask, range(8)))
    for i, (text, reason) in enumerate(replies):
        expected_text, expected_reason, _ = expected(model, tokenizer, encode_prompt(tokenizer, prompts[i]),
                                                     max_new_tokens=budgets[i])
        assert (text, reason) == (expected_text, expected_reason), i
    stats = httpx.get(url + "/health").json()
    assert stats["largest_batch"] > 1  # requests that waited together were decoded as one batch


def test_wrong_or_missing_api_key_is_401(served):
    url = served[0]
    bad = openai.OpenAI(base_url=url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    r = httpx.post(url + "/v1/completions", json={"model": NAME, "prompt": "x"})
    assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_bad_requests_get_openai_shaped_4xx(served, client):
    url = served[0]
    auth = {"Authorization": f"Bearer {KEY}"}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], temperature="hot")
    assert e.value.param == "temperature"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt="word " * 90, max_tokens=20)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:  # over --max_tokens_limit
        client.completions.create(model=NAME, prompt="hi", max_tokens=65)
    assert e.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=NAME, messages=[])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=NAME, messages=[{"role": "wizard", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=NAME, prompt=[10 ** 9], max_tokens=2)

    cases = [
        (b"{not json", 400),
        (b"[1, 2]", 400),
        (json.dumps({"model": NAME}).encode(), 400),  # no prompt
        (json.dumps({"model": NAME, "prompt": "x" * 30000}).encode(), 413),  # over --max_body_bytes
    ]
    for body, status in cases:
        r = httpx.post(url + "/v1/completions", content=body, headers={**auth, "Content-Type": "application/json"})
        assert r.status_code == status, (body[:40], r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
    r = httpx.get(url + "/v1/nothing-here", headers=auth)
    assert r.status_code == 404 and "error" in r.json()
    # the server is still healthy after all that
    assert client.completions.create(model=NAME, prompt="ok", max_tokens=2, temperature=0).choices[0].text


def test_a_request_that_arrives_mid_batch_joins_it_and_finishes_first(gpt2_tokenizer):
    """Continuous batching, in-process: a short request sent while a long one decodes joins the running
    batch and is answered before the long one ends; both answers equal generation alone."""
    import asyncio

    from posttrain.serve import Engine, Job

    torch.manual_seed(0)
    model = build_model(GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=512)).eval()
    tokenizer = gpt2_tokenizer
    long_prompt, short_prompt = tokenizer.encode("Once upon a time"), tokenizer.encode("Hello there")
    long_config, short_config = GenerationConfig(max_new_tokens=400), GenerationConfig(max_new_tokens=5)
    long_alone = generate_batch(model, tokenizer, [long_prompt], [long_config])[0]
    assert len(long_alone.ids) == 400  # no early EOS: the long request really is long

    async def scenario():
        engine = Engine(model, tokenizer, max_batch=4, batch_wait_s=0)
        await engine.start()
        events: asyncio.Queue = asyncio.Queue()
        engine.submit([Job(0, long_prompt, long_config, True, events)])
        assert (await events.get())[:2] == ("text", 0)  # the long request is decoding
        engine.submit([Job(1, short_prompt, short_config, False, events)])
        finished, results = [], {}
        while len(results) < 2:
            kind, index, payload = await events.get()
            if kind == "error":
                raise payload
            if kind == "done":
                finished.append(index)
                results[index] = payload
        await engine.stop()
        return finished, results, engine.stats

    finished, results, stats = asyncio.run(scenario())
    assert finished == [1, 0]  # the short request did not wait for the long one
    assert results[1].ids == generate_batch(model, tokenizer, [short_prompt], [short_config])[0].ids
    assert results[0].ids == long_alone.ids
    assert stats.batches == 1 and stats.rows == 2 and stats.largest_batch == 2
