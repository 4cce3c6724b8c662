"""Attention masks and backends: FlexAttention's document-causal block mask against masked SDPA.

On CUDA, packed rows go through FlexAttention (models/flex.py); everywhere else through SDPA with a
boolean mask. These tests force each backend with POSTTRAIN_ATTENTION and hold them to each other
on CPU, where flex_attention runs eagerly (its reference implementation, not the fused kernel).
Torch refuses flex_attention's backward on CPU by a device check only (`_validate_device`); its
reference backward exists, so the gradient tests lift that check to compare gradients.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.attention.flex_attention as torch_flex

from posttrain.models import attention, flex
from posttrain.models.attention import ATTENTION_ENV, attention_backend, attention_mask, scaled_dot_product
from posttrain.models.flex import BlockMask

# Eager flex_attention warns once that it is unfused; that is expected in CPU tests.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

FAMILIES = ["gpt2", "llama"]  # tiny Llama: 4 query heads over 2 kv heads (grouped-query)


@pytest.fixture
def use_backend(monkeypatch):
    def use(name: str) -> None:
        monkeypatch.setenv(ATTENTION_ENV, name)
    return use


@pytest.fixture
def flex_backward_on_cpu(monkeypatch):
    """Let flex_attention run its (reference) backward on CPU: torch blocks it with a device check."""
    def no_backward_check(query, key, value):
        pass
    monkeypatch.setattr(torch_flex, "_validate_device", no_backward_check)


def packed_batch(T: int = 48, vocab: int = 320, seed: int = 0) -> dict:
    """Two packed rows, several documents each, the first with a pad tail (its own document id)."""
    g = torch.Generator().manual_seed(seed)
    lengths = [[9, 14, 7, 11, 7], [20, 5, 23]]  # row 0: 4 documents + 7 pad slots
    doc = torch.zeros(2, T, dtype=torch.long)
    pos = torch.zeros(2, T, dtype=torch.long)
    for r, row in enumerate(lengths):
        col = 0
        for d, n in enumerate(row):
            doc[r, col:col + n], pos[r, col:col + n] = d, torch.arange(n)
            col += n
        assert col == T
    return {"input_ids": torch.randint(0, vocab, (2, T), generator=g), "position_ids": pos,
            "document_ids": doc, "lengths": lengths}


def run(model, batch: dict) -> torch.Tensor:
    return model(batch["input_ids"], position_ids=batch["position_ids"], document_ids=batch["document_ids"])


def test_backend_setting(use_backend):
    for name in ("auto", "flex", "sdpa"):
        use_backend(name)
        assert attention_backend() == name
    use_backend("flash")
    with pytest.raises(ValueError, match="POSTTRAIN_ATTENTION='flash'"):
        attention_backend()


def test_mask_kind_follows_backend_device_and_cache(use_backend):
    doc = packed_batch()["document_ids"]
    use_backend("auto")  # CPU: SDPA with a boolean mask
    assert attention_mask(doc, None, 2, 48).dtype == torch.bool
    use_backend("flex")
    assert isinstance(attention_mask(doc, None, 2, 48), BlockMask)
    assert attention_mask(None, None, 2, 48) is None  # no documents: plain causal either way
    cache = attention.KVCache(1, 2, 1, 64, 8, torch.float32, "cpu")
    assert attention_mask(doc, cache, 2, 48).dtype == torch.bool  # KV-cache steps stay on SDPA
    use_backend("sdpa")
    assert attention_mask(doc, None, 2, 48).dtype == torch.bool


def test_block_mask_equals_boolean_mask(use_backend):
    """Element by element (mask_mod) and tile by tile: no allowed slot lies in a tile flex skips."""
    T = 300  # three 128-wide tiles, the last one partial
    doc = torch.tensor([[0] * 128 + [1] * 128 + [2] * 30 + [3] * 14,  # documents aligned to tiles
                        [0] * 5 + [1] * 200 + [2] * 95])
    use_backend("sdpa")
    boolean = attention_mask(doc, None, 2, T)  # (B, 1, T, T)
    use_backend("flex")
    block = attention_mask(doc, None, 2, T)
    dense = torch_flex.create_mask(block.mask_mod, 2, 1, T, T, device="cpu")
    assert torch.equal(dense, boolean)
    tiles = block.to_dense()  # (B, 1, 3, 3): 1 where flex computes the tile
    padded = torch.zeros(2, 384, 384, dtype=torch.bool)
    padded[:, :T, :T] = boolean[:, 0]
    needed = padded.reshape(2, 3, 128, 3, 128).any(4).any(2)  # (B, 3, 3)
    assert torch.all(tiles[:, 0].bool() | ~needed)  # every tile with an allowed slot is computed
    assert torch.equal(tiles[0, 0], torch.eye(3, dtype=torch.int32))  # row 0: off-diagonal tiles skipped


@pytest.mark.parametrize("family", FAMILIES)
def test_flex_logits_equal_sdpa(family, make_tiny_model, use_backend):
    model, batch = make_tiny_model(family), packed_batch()
    with torch.no_grad():
        use_backend("sdpa")
        expected = run(model, batch)
        use_backend("flex")
        got = run(model, batch)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_flex_gradients_equal_sdpa(family, make_tiny_model, use_backend, flex_backward_on_cpu):
    model, batch = make_tiny_model(family), packed_batch()
    grads = {}
    for name in ("sdpa", "flex"):
        use_backend(name)
        model.zero_grad(set_to_none=True)
        logits = run(model, batch)
        (logits.square().mean() + logits[0, 5].logsumexp(-1)).backward()
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert grads["flex"].keys() == grads["sdpa"].keys()
    for n in grads["sdpa"]:
        torch.testing.assert_close(grads["flex"][n], grads["sdpa"][n], atol=1e-5, rtol=0, msg=n)


@pytest.mark.parametrize("backend", ["flex", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_row_equals_documents_one_by_one(family, backend, make_tiny_model, use_backend):
    model, batch = make_tiny_model(family), packed_batch()
    use_backend(backend)
    with torch.no_grad():
        packed = run(model, batch)
        use_backend("sdpa")  # each document alone: plain causal attention
        for r, row in enumerate(batch["lengths"]):
            col = 0
            for n in row:
                alone = model(batch["input_ids"][r:r + 1, col:col + n])[0]
                torch.testing.assert_close(packed[r, col:col + n], alone, atol=1e-5, rtol=0)
                col += n


def test_one_block_mask_per_forward_shared_by_layers(make_tiny_model, use_backend, monkeypatch):
    model, batch = make_tiny_model("llama", num_hidden_layers=3), packed_batch()
    built, seen = [], []
    real_build, real_attention = flex.document_block_mask, flex.attention

    def build(document_ids):
        built.append(real_build(document_ids))
        return built[-1]

    def attend(q, k, v, block_mask):
        seen.append(block_mask)
        return real_attention(q, k, v, block_mask)

    monkeypatch.setattr(flex, "document_block_mask", build)
    monkeypatch.setattr(flex, "attention", attend)
    use_backend("flex")
    with torch.no_grad():
        run(model, batch)
    assert len(built) == 1 and len(seen) == 3 and all(m is built[0] for m in seen)


def test_flex_under_bf16_autocast_matches_sdpa(make_tiny_model, use_backend):
    """Llama's rotary embedding leaves q, k in fp32 and v in bf16 under autocast; flex must cast them."""
    model, batch = make_tiny_model("llama"), packed_batch()
    out = {}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for name in ("sdpa", "flex"):
            use_backend(name)
            out[name] = run(model, batch).float()
    torch.testing.assert_close(out["flex"], out["sdpa"], atol=2e-2, rtol=0)


def test_flex_inputs_take_the_autocast_dtype(monkeypatch):
    got = []
    real = flex.flex_attention

    def spy(q, k, v, **kw):
        got.append((q.dtype, k.dtype, v.dtype))
        return real(q, k, v, **kw)

    monkeypatch.setattr(flex, "flex_attention", spy)
    block = flex.document_block_mask(packed_batch()["document_ids"])
    q, k = torch.randn(2, 4, 48, 8), torch.randn(2, 2, 48, 8)  # fp32, as rotary leaves them
    v = torch.randn(2, 2, 48, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = flex.attention(q, k, v, block)
    assert got == [(torch.bfloat16,) * 3] and out.dtype == torch.bfloat16


def test_scaled_dot_product_dispatches_on_mask_type(use_backend):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 48, 8, generator=g) for _ in range(3))
    doc = packed_batch()["document_ids"]
    use_backend("flex")
    block = attention_mask(doc, None, 2, 48)
    use_backend("sdpa")
    boolean = attention_mask(doc, None, 2, 48)
    torch.testing.assert_close(scaled_dot_product(q, k, v, block), scaled_dot_product(q, k, v, boolean),
                               atol=1e-6, rtol=0)
    causal = scaled_dot_product(q, k, v, None)
    assert not torch.allclose(causal, scaled_dot_product(q, k, v, boolean), atol=1e-3)  # the mask matters


def test_compiled_blocks_take_a_new_block_mask_each_step_without_recompiling(make_tiny_model, use_backend):
    """As the loop compiles blocks (train/loop.py: _compile_blocks): the BlockMask is a block input whose
    mask_mod is a new closure every step; dynamo must reuse its graph, not recompile per batch."""
    from torch._dynamo.utils import counters

    from posttrain.train.loop import _compile_blocks

    torch._dynamo.reset()
    counters.clear()
    compiled, eager = make_tiny_model("gpt2"), make_tiny_model("gpt2")
    _compile_blocks(compiled, backend="aot_eager")  # the graph capture of inductor, without C++ compilation
    for seed in range(3):
        batch = packed_batch(seed=seed)
        batch["document_ids"] = batch["document_ids"].roll(seed * 5, dims=1)  # a new layout each step
        with torch.no_grad():
            use_backend("flex")
            got = run(compiled, batch)
            use_backend("sdpa")
            expected = run(eager, batch)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()
