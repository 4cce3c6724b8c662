"""The chunked LM head + cross-entropy equals the plain one (loss and both gradients) and never
keeps an (N, V) logit matrix for the backward pass."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from posttrain.models.gpt2 import GPT2Config
from posttrain.models.registry import build_model
from posttrain.train.linear_cross_entropy import default_chunk_size, linear_cross_entropy
from posttrain.train.losses import IGNORE_INDEX, sft_loss

N, C, V = 37, 16, 101


def inputs(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, C, generator=g, dtype=dtype).requires_grad_()
    weight = torch.randn(V, C, generator=g, dtype=dtype).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g)
    return hidden, weight, targets


def plain(hidden, weight, targets):
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")


@pytest.mark.parametrize("chunk_size", [1, 5, 16, N, 1000])  # 5 and 16 do not divide 37
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_loss_and_gradients_equal_the_plain_head(chunk_size, dtype, tol):
    """float64: the same function to rounding; float32: the same up to float32's rounding."""
    h1, w1, t = inputs(dtype=dtype)
    h2, w2, _ = inputs(dtype=dtype)
    expected = F.cross_entropy(F.linear(h1, w1), t, reduction="sum")
    (3.0 * expected).backward()  # an incoming gradient other than 1 is passed on
    got = linear_cross_entropy(h2, w2, t, chunk_size)
    (3.0 * got).backward()
    assert got.item() == pytest.approx(expected.item(), rel=tol)
    scale = h1.grad.abs().max()
    torch.testing.assert_close(h2.grad, h1.grad, rtol=0, atol=tol * scale)
    torch.testing.assert_close(w2.grad, w1.grad, rtol=0, atol=tol * w1.grad.abs().max())


def test_loss_by_hand_on_two_tokens():
    hidden = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # logits [1, 0, 1] and [0, 2, 2]
    targets = torch.tensor([0, 1])
    import math
    by_hand = (math.log(2 * math.e + 1) - 1) + (math.log(1 + 2 * math.e ** 2) - 2)
    assert linear_cross_entropy(hidden, weight, targets, 1).item() == pytest.approx(by_hand, rel=1e-6)


def test_frozen_weight_gets_no_gradient_and_states_still_do():
    h1, w1, t = inputs()
    h2, w2, _ = inputs()
    w1.requires_grad_(False)
    w2.requires_grad_(False)
    plain(h1, w1, t).backward()
    linear_cross_entropy(h2, w2, t, 8).backward()
    assert w2.grad is None
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-5, atol=1e-6)


def test_without_gradients_it_only_computes_the_loss():
    h, w, t = inputs()
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, t, 8)
    assert not loss.requires_grad
    assert loss.item() == pytest.approx(plain(h, w, t).item(), rel=1e-6)


def test_bf16_autocast_stays_close_to_the_plain_head():
    h1, w1, t = inputs()
    h2, w2, _ = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = plain(h1, w1, t)
        got = linear_cross_entropy(h2, w2, t, 8)
    expected.backward()
    got.backward()
    assert got.dtype == torch.float32 and h2.grad.dtype == torch.float32 and w2.grad.dtype == torch.float32
    assert got.item() == pytest.approx(expected.item(), rel=1e-2)
    torch.testing.assert_close(h2.grad, h1.grad, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(w2.grad, w1.grad, rtol=3e-2, atol=3e-2)


def saved_shapes(fn):
    """Shapes of every tensor autograd saves for the backward pass while fn() runs."""
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return shapes


def test_no_logit_matrix_is_kept_for_backward():
    h, w, t = inputs()
    plain_saved = saved_shapes(lambda: plain(h, w, t))
    chunked_saved = saved_shapes(lambda: linear_cross_entropy(h, w, t, 8))
    assert (N, V) in plain_saved  # the check can fail: the plain head keeps its logits
    assert all(V not in shape for shape in chunked_saved if shape != (V, C)), chunked_saved


def test_chunk_size_holds_about_256_mib_of_fp32_logits():
    assert default_chunk_size(50257) == 1335
    assert default_chunk_size(128256) == 523
    assert default_chunk_size(10**9) == 128  # never below 128 tokens


def test_sft_loss_through_the_tied_gpt2_head_equals_the_plain_loss():
    """GPT-2's head is its embedding: the weight gets gradient from both uses."""
    torch.manual_seed(0)
    model = build_model(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=97, n_positions=32))
    ids = torch.randint(0, 97, (3, 12))
    targets = torch.randint(0, 97, (3, 12))
    targets[0, :4] = IGNORE_INDEX
    batch = {"input_ids": ids, "targets": targets, "position_ids": None, "document_ids": None}

    loss, n, _ = sft_loss(model, batch)
    loss.backward()
    fused = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    mask = targets != IGNORE_INDEX
    logits = model(ids)[mask]
    expected = F.cross_entropy(logits.float(), targets[mask], reduction="sum")
    expected.backward()
    assert int(n) == int(mask.sum())
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    for k, p in model.named_parameters():
        torch.testing.assert_close(fused[k], p.grad, rtol=1e-4, atol=1e-6, msg=k)


def test_sft_loss_with_an_adapted_head_takes_the_head_forward():
    """A head that is not a plain bias-free Linear (here one with a bias) is called as a module."""
    torch.manual_seed(0)
    model = build_model(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16))
    model.lm_head = nn.Linear(16, 50, bias=True)
    nn.init.constant_(model.lm_head.bias, 5.0)
    ids = torch.randint(0, 50, (2, 8))
    batch = {"input_ids": ids, "targets": ids.roll(-1, 1), "position_ids": None, "document_ids": None}
    loss, _, _ = sft_loss(model, batch)
    expected = F.cross_entropy(model(ids).flatten(0, 1).float(), ids.roll(-1, 1).flatten(), reduction="sum")
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_fp16_with_a_loss_scaler_sized_gradient_stays_finite():
    """Under fp16, GradScaler multiplies the loss by up to 2^16: the stored fp16 gradients are scaled
    in fp32, so the states' gradient neither overflows nor loses the factor."""
    h_ref, w_ref, t = inputs()
    h, w, _ = inputs()
    (2.0**16 * plain(h_ref, w_ref, t)).backward()
    with torch.autocast("cpu", dtype=torch.float16):
        loss = linear_cross_entropy(h, w, t, 8)
    (2.0**16 * loss).backward()
    assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=2e-2, atol=2e-2 * h_ref.grad.abs().max().item())
