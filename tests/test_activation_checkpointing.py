"""Activation checkpointing (train.activation_checkpointing): the same gradients and the same run
as without it, fewer activations kept for the backward pass."""

import json

import pytest
import torch
import torch.utils.checkpoint

from posttrain.lora import LoraConfig, apply_lora
from posttrain.train.loop import TrainConfig, _checkpoint_blocks, train
from posttrain.train.losses import IGNORE_INDEX, sft_loss


def packed_batch(vocab: int, seed: int = 0) -> dict:
    """Two rows, each holding two documents (positions restart, document ids differ)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab - 10, (2, 24), generator=g)
    targets = ids.roll(-1, 1)
    targets[:, -1] = IGNORE_INDEX
    targets[:, 9] = IGNORE_INDEX  # the last token of the first document predicts nothing
    position_ids = torch.cat([torch.arange(10), torch.arange(14)]).expand(2, 24).clone()
    document_ids = torch.cat([torch.zeros(10), torch.ones(14)]).long().expand(2, 24).clone()
    return {"input_ids": ids, "targets": targets, "position_ids": position_ids, "document_ids": document_ids}


def gradients(model, batch) -> dict:
    model.zero_grad()
    loss, _, _ = sft_loss(model, batch)
    loss.backward()
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def saved_bytes(model, batch) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sft_loss(model, batch)[0].backward()
    return total


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_checkpointed_blocks_give_the_same_gradients_and_keep_less(make_tiny_model, kind):
    plain, checkpointed = make_tiny_model(kind).train(), make_tiny_model(kind).train()
    _checkpoint_blocks(checkpointed)
    batch = packed_batch(plain.config.vocab_size)
    expected, got = gradients(plain, batch), gradients(checkpointed, batch)
    assert expected.keys() == got.keys()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-7, msg=k)
    assert list(checkpointed.state_dict()) == list(plain.state_dict())  # no key renamed
    assert saved_bytes(checkpointed, batch) < 0.6 * saved_bytes(plain, batch)


def test_checkpointing_twice_wraps_once(make_tiny_model):
    model = make_tiny_model("gpt2")
    _checkpoint_blocks(model)
    first = [b.forward for b in model.transformer.h]
    _checkpoint_blocks(model)
    assert [b.forward for b in model.transformer.h] == first


def test_lora_dropout_draws_the_same_masks_when_recomputed(make_tiny_model):
    """Non-reentrant checkpointing restores the RNG state: dropout in the adapters recomputes alike."""
    lora = LoraConfig(r=4, alpha=8, dropout=0.5, targets="all-linear")
    plain = apply_lora(make_tiny_model("llama").train(), lora, seed=1, verbose=False)
    checkpointed = apply_lora(make_tiny_model("llama").train(), lora, seed=1, verbose=False)
    _checkpoint_blocks(checkpointed)
    batch = packed_batch(plain.config.vocab_size)
    torch.manual_seed(5)
    expected = gradients(plain, batch)
    torch.manual_seed(5)
    got = gradients(checkpointed, batch)
    assert expected and expected.keys() == got.keys()
    assert all("lora_" in k for k in got)  # the base stays frozen
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-7, msg=k)


class Batches:
    def __init__(self, vocab):
        self.batches = [packed_batch(vocab, seed) for seed in range(4)]

    def __len__(self):
        return len(self.batches)

    def epoch(self, epoch, start=0):
        return iter(self.batches[start:])


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("compile_backend", [False, "aot_eager"])
def test_a_checkpointed_run_equals_the_plain_run(make_tiny_model, tmp_path, compile_backend):
    def run(name, checkpointing):
        model = make_tiny_model("gpt2").train()
        config = TrainConfig(lr=1e-2, max_steps=4, log_every=1, progress=False, tensorboard=False,
                             activation_checkpointing=checkpointing, compile=compile_backend)
        train(model, config, Batches(model.config.vocab_size), sft_loss, tmp_path / name)
        return model

    plain, checkpointed = run("plain", False), run("checkpointed", True)
    assert losses(tmp_path / "checkpointed") == pytest.approx(losses(tmp_path / "plain"), abs=1e-5)
    for (k, a), b in zip(plain.state_dict().items(), checkpointed.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=k)


def test_the_cli_flag_reaches_the_loop_and_changes_nothing_but_memory(tmp_path, tiny_tokenizer, monkeypatch):
    from posttrain import cli
    from test_sft import save_tiny_llama, write_alpaca

    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))
    model_dir = save_tiny_llama(tiny_tokenizer, tmp_path / "tiny-llama")
    data = write_alpaca(tmp_path / "alpaca.json")
    calls = []
    checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint",
                        lambda *args, **kwargs: calls.append(1) or checkpoint(*args, **kwargs))
    counted = {}
    for flag in ("false", "true"):
        calls.clear()
        cli.main(["sft", "--model", str(model_dir), "--data.path", str(data), "--data.style", "alpaca",
                  "--data.batching", "packed", "--data.max_length", "256", "--train.max_steps", "3",
                  "--train.log_every", "1", "--train.progress", "false", "--train.tensorboard", "false",
                  "--train.activation_checkpointing", flag, "--samples.prompts", "0",
                  "--run_dir", str(tmp_path / flag)])
        counted[flag] = len(calls)
    assert counted == {"false": 0, "true": 3 * 2}  # 3 steps x 2 blocks, none in evaluation
    config = (tmp_path / "true" / "config.yaml").read_text()
    assert "activation_checkpointing: true" in config
    assert losses(tmp_path / "true") == pytest.approx(losses(tmp_path / "false"), abs=1e-5)


def test_compile_traces_the_checkpoint_into_its_graph(make_tiny_model):
    """Compiled after wrapping, each block's graph holds the checkpoint as one operator (no graph break)."""
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    model = make_tiny_model("gpt2").train()
    _checkpoint_blocks(model)
    for block in model.transformer.h:
        block.compile(backend=recording_backend)
    expected = gradients(make_tiny_model("gpt2").train(), packed_batch(model.config.vocab_size))
    got = gradients(model, packed_batch(model.config.vocab_size))
    torch._dynamo.reset()
    assert graphs and all(any("checkpoint" in str(node.target) for node in g.graph.nodes) for g in graphs)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # expected on a CPU
def test_flex_attention_block_masks_pass_through_the_checkpoint(make_tiny_model, monkeypatch):
    """The CUDA path hands a FlexAttention BlockMask (not a tensor) to every block: run flex here (its
    reference kernels, the CPU backward check lifted) and compare with and without checkpointing."""
    import torch.nn.attention.flex_attention as torch_flex
    from posttrain.models.attention import ATTENTION_ENV

    monkeypatch.setenv(ATTENTION_ENV, "flex")
    monkeypatch.setattr(torch_flex, "_validate_device", lambda query, key, value: None)
    plain, checkpointed = make_tiny_model("llama").train(), make_tiny_model("llama").train()
    _checkpoint_blocks(checkpointed)
    batch = packed_batch(plain.config.vocab_size)
    expected, got = gradients(plain, batch), gradients(checkpointed, batch)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-7, msg=k)
