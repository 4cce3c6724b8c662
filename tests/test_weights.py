"""Loading (hub cache, local and run directories, GGUF), export to Hugging Face format, resizing."""

from __future__ import annotations

import json
import os
import socket
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from posttrain.generate import saved_style
from posttrain.models.llama import rope_frequencies
from posttrain.models.registry import PRESETS
from posttrain.models.resize import resize_token_embeddings
from posttrain.weights import export_command, load, load_model, save_pretrained
from posttrain.weights.gguf import permute
from posttrain.weights.hub import resolve

TOL = 1e-4


def _ids(vocab: int = 320, length: int = 48, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(seed))


def _hf_model(kind: str) -> transformers.PreTrainedModel:
    """A tiny random transformers model (norms and biases randomised too)."""
    torch.manual_seed(0)
    common = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if kind == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=320, n_positions=128, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0))
    elif kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, rope_theta=1e6,
                                                                       tie_word_embeddings=True))
    else:  # untied llama with attention bias and llama3 rope scaling
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            **common, tie_word_embeddings=False, attention_bias=True,
            rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 32}))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """Tiny transformers models saved with save_pretrained: {kind: (model, directory)}."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for kind in ("gpt2", "llama", "qwen2"):
        model = _hf_model(kind)
        model.save_pretrained(root / kind)
        out[kind] = (model, root / kind)
    return out


def _max_diff(ours: torch.nn.Module, hf, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return (ours(ids) - hf(ids).logits).abs().max().item()


# -- parity and the shared hub / local-directory path -----------------------------------------------

@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2"])
def test_local_dir_parity_with_transformers(hf_dirs, kind):
    hf, directory = hf_dirs[kind]
    model = load_model(str(directory))
    assert type(model).__name__ == ("GPT2" if kind == "gpt2" else "Llama")
    assert _max_diff(model, hf, _ids()) <= TOL


def test_hub_id_and_preset_resolve_through_the_cache(hf_dirs, hf_cache):
    hf, directory = hf_dirs["llama"]
    snapshot = hf_cache.add("tiny-org/tiny-llama", directory)
    assert resolve("tiny-org/tiny-llama").path.resolve() == snapshot.resolve()
    assert _max_diff(load_model("tiny-org/tiny-llama"), hf, _ids()) <= TOL
    # A preset alias is its hub id: a (tiny stand-in) gpt2-medium found in the cache, offline.
    hf2, directory2 = hf_dirs["gpt2"]
    hf_cache.add(PRESETS["gpt2-medium"].hub_id, directory2)
    assert _max_diff(load_model("gpt2-medium"), hf2, _ids()) <= TOL


def test_hf_home_alone_locates_the_cache(hf_dirs, tmp_path, monkeypatch):
    """With only HF_HOME set (no HF_HUB_CACHE), the hub cache is HF_HOME/hub, read at call time."""
    from conftest import HubCache

    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf, directory = hf_dirs["qwen2"]
    snapshot = HubCache(tmp_path / "home" / "hub").add("tiny-org/tiny-qwen", directory)
    assert resolve("tiny-org/tiny-qwen").path.resolve() == snapshot.resolve()
    assert _max_diff(load_model("tiny-org/tiny-qwen"), hf, _ids()) <= TOL
    with pytest.raises(ConnectionError, match=f"not in the cache at {tmp_path / 'home' / 'hub'}"):
        load_model("tiny-org/elsewhere")


def test_hub_keys_without_prefix_and_with_attention_buffers(hf_dirs, tmp_path):
    """openai-community/gpt2's safetensors name keys "h.0..." and carry attn.bias buffers."""
    from safetensors.torch import load_file, save_file

    hf, directory = hf_dirs["gpt2"]
    state = load_file(str(directory / "model.safetensors"))
    legacy = {k.removeprefix("transformer."): v for k, v in state.items()}
    legacy["h.0.attn.bias"] = torch.ones(1, 1, 128, 128)
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    save_file(legacy, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    assert _max_diff(load_model(str(tmp_path)), hf, _ids()) <= TOL


def test_offline_default_resolves_to_packaged_gguf(smollm2_gguf_path, hf_cache):
    source = resolve("smollm2-135m-instruct")  # HF_HUB_OFFLINE=1 and an empty cache: no network used
    assert source.kind == "gguf" and source.path == smollm2_gguf_path


def test_a_folder_named_like_a_preset_does_not_hide_it(smollm2_gguf_path, hf_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smollm2-135m-instruct" / "eval").mkdir(parents=True)  # e.g. eval outputs named after the model
    assert resolve("smollm2-135m-instruct").path == smollm2_gguf_path
    with pytest.raises(ValueError, match="not a model directory"):  # ./name still means the folder
        resolve("./smollm2-135m-instruct")
    (tmp_path / "runs" / "sft-x" / "checkpoints").mkdir(parents=True)  # a run still training: no model/ yet
    with pytest.raises(ValueError, match="not a model directory"):  # not sent to the hub as an org/name id
        resolve("runs/sft-x")


# -- export -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["gpt2", "llama3", "qwen2"])
def test_export_round_trip(make_tiny_model, tiny_tokenizer, tmp_path, kind):
    model = make_tiny_model(kind)
    out = save_pretrained(model, tiny_tokenizer, tmp_path / "export")
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "generation_config.json",
                                              "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    assert not list(tmp_path.glob(".export*"))  # the temporary directory was renamed away
    config = json.loads((out / "config.json").read_text())
    if kind == "llama3":
        assert config["rope_theta"] == 500000.0 and config["rope_scaling"]["rope_type"] == "llama3"

    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert _max_diff(model, hf, _ids()) <= TOL
    reloaded = load_model(str(out))
    assert type(reloaded.config) is type(model.config) and reloaded.config.to_hf() == model.config.to_hf()
    with torch.no_grad():
        assert torch.equal(reloaded(_ids()), model(_ids()))

    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "Hi <|im_end|> there, naïve café!"
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    assert hf_tok(text, add_special_tokens=False).input_ids == tiny_tokenizer.encode_markup(text)
    assert hf_tok(text, add_special_tokens=False, split_special_tokens=True).input_ids == tiny_tokenizer.encode(text)
    assert hf_tok.eos_token_id == tiny_tokenizer.eos_id and hf_tok.pad_token_id == tiny_tokenizer.pad_id
    assert hf_tok.apply_chat_template(messages, tokenize=False) == tiny_tokenizer.render_chat_text(messages)


def test_export_tied_lm_head_and_conv1d_layout(tiny_gpt2, tmp_path):
    from safetensors import safe_open

    out = save_pretrained(tiny_gpt2, None, tmp_path / "gpt2")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()  # tied: transformers re-ties it from wte
        c_attn = f.get_tensor("transformer.h.0.attn.c_attn.weight")
    assert torch.equal(c_attn, tiny_gpt2.transformer.h[0].attn.c_attn.weight.t())  # Conv1D (in, out)


def test_export_is_atomic_and_refuses_foreign_dirs(tiny_llama, tiny_tokenizer, tmp_path):
    out = tmp_path / "model"
    save_pretrained(tiny_llama, tiny_tokenizer, out)
    (out / "stale.txt").write_text("from an older export")
    save_pretrained(tiny_llama, tiny_tokenizer, out)  # replaces the old directory whole
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a model directory"):
        save_pretrained(tiny_llama, tiny_tokenizer, foreign)
    assert (foreign / "todo.txt").read_text() == "keep me"


def test_run_directory_and_export_command(tiny_llama, tiny_tokenizer, tmp_path):
    run = tmp_path / "runs" / "sft-1"
    save_pretrained(tiny_llama, tiny_tokenizer, run / "model")
    model, tokenizer = load(str(run))
    with torch.no_grad():
        assert torch.equal(model(_ids()), tiny_llama(_ids()))
    assert tokenizer.chat_template == tiny_tokenizer.chat_template
    (run / "model" / "posttrain.json").write_text(json.dumps({"prompt_style": "alpaca"}))
    out = export_command(str(run), str(tmp_path / "exported"), dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert saved_style(str(out)) == "alpaca"  # the export prompts as the run was trained
    assert load_model(str(out)).lm_head.weight.dtype == torch.float32  # loaded at the dtype asked for
    with pytest.raises(ValueError, match="dtype"):
        export_command(str(run), str(tmp_path / "x"), dtype="int3")


# -- GGUF ---------------------------------------------------------------------------------------------

_GGUF_NAMES = {
    "gpt2": ("transformer.h.", {"transformer.wte": "token_embd", "transformer.wpe": "position_embd",
                                "transformer.ln_f": "output_norm", "lm_head": "output"},
             {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
              "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}),
    "llama": ("model.layers.", {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"},
              {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
               "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}),
}


def _write_gguf(model, path: Path) -> None:
    """Write a native model as llama.cpp's converter would: F32, llama.cpp tensor names, Llama's q/k rows
    permuted, GPT-2's projections in (out, in) layout; a minimal tokenizer so transformers reads it."""
    import gguf

    c, arch = model.config, model.config.model_type
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(c.num_layers)
    writer.add_context_length(c.max_length)
    writer.add_embedding_length(c.hidden_size)
    writer.add_head_count(c.n_head if arch == "gpt2" else c.num_attention_heads)
    if arch == "gpt2":
        writer.add_feed_forward_length(4 * c.n_embd)
        writer.add_layer_norm_eps(c.layer_norm_epsilon)
    else:
        writer.add_feed_forward_length(c.intermediate_size)
        writer.add_head_count_kv(c.num_key_value_heads)
        writer.add_rope_freq_base(c.rope_theta)
        writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(c.vocab_size)])
    writer.add_token_types([1] * c.vocab_size)
    writer.add_token_merges(["t 0"])
    writer.add_eos_token_id(0)
    prefix, global_names, layer_names = _GGUF_NAMES["gpt2" if arch == "gpt2" else "llama"]
    tied = model.lm_head.weight is (model.transformer.wte if arch == "gpt2" else model.model.embed_tokens).weight
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight" and tied:
            continue
        base, kind = key.rsplit(".", 1)
        if base.startswith(prefix):
            n, rest = base[len(prefix):].split(".", 1)
            name = f"blk.{n}.{layer_names[rest]}.{kind}"
        else:
            name = f"{global_names[base]}.{kind}"
        data = tensor.numpy().astype(np.float32)
        if arch == "llama" and ".attn_q." in name:
            data = permute(data, c.num_attention_heads)
        elif arch == "llama" and ".attn_k." in name:
            data = permute(data, c.num_key_value_heads)
        writer.add_tensor(name, data)
    if getattr(c, "rope_scaling", None):  # Llama 3.1+: per-frequency divisors, as llama.cpp writes them
        divisors = rope_frequencies(replace(c, rope_scaling=None)) / rope_frequencies(c)
        writer.add_tensor("rope_freqs.weight", divisors.numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


LLAMA3_SCALING = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("kind,overrides", [("llama", {}), ("llama", {"tie_word_embeddings": False}),
                                            ("qwen2", {}), ("gpt2", {"n_positions": 1024}),
                                            ("llama3", {"rope_scaling": LLAMA3_SCALING})])
def test_gguf_matches_source_and_transformers(make_tiny_model, tmp_path, kind, overrides):
    """The llama.cpp layout (names, q/k permutation, GPT-2 transposes) undone, as transformers does."""
    model = make_tiny_model(kind, **overrides)  # (transformers reads GPT-2's context length as n_ctx: keep 1024)
    _write_gguf(model, tmp_path / "tiny.gguf")
    loaded = load_model(str(tmp_path / "tiny.gguf"))
    assert loaded.config.to_hf()["tie_word_embeddings"] == model.config.to_hf()["tie_word_embeddings"]
    assert loaded.config.model_type == model.config.model_type
    with torch.no_grad():
        assert (loaded(_ids()) - model(_ids())).abs().max().item() <= 1e-6
    if kind == "llama3":  # transformers' GGUF loader ignores rope_freqs: compare the recovered scaling instead
        assert loaded.config.rope_scaling == LLAMA3_SCALING
        return
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf").eval()
    assert _max_diff(loaded, hf, _ids()) <= TOL


# -- real weights, offline -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_transformers(smollm2_gguf_path):
    """transformers' own load of the same GGUF (~20 s on two cores)."""
    return transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf_path.parent, gguf_file=smollm2_gguf_path.name, dtype=torch.float32).eval()


def test_smollm2_gguf_matches_transformers(smollm2, smollm2_transformers):
    model, tokenizer = smollm2
    assert model.config.num_hidden_layers == 30 and model.config.tie_word_embeddings
    ids, _ = tokenizer.render_chat([{"role": "user", "content": "Name three colours."}],
                                   add_generation_prompt=True)
    assert _max_diff(model, smollm2_transformers, torch.tensor([ids])) <= 1e-3


def test_smollm2_answers_paris(smollm2):
    model, tokenizer = smollm2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tokenizer.render_chat_text(messages, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nWhat is the capital" in text
    ids, trainable = tokenizer.render_chat(messages, add_generation_prompt=True)
    assert not any(trainable)
    cache, answer = model.new_cache(1, len(ids) + 12), []
    with torch.no_grad():  # 12 greedy steps on the KV cache (posttrain.generate has the real sampler)
        logits = model(torch.tensor([ids]), cache=cache)
        for _ in range(12):
            answer.append(int(logits[0, -1].argmax()))
            logits = model(torch.tensor([answer[-1:]]), cache=cache)
    assert "Paris" in tokenizer.decode(answer)


# -- bad inputs ---------------------------------------------------------------------------------------

def test_unknown_name_lists_presets(hf_cache):
    with pytest.raises(ValueError, match="unknown model 'gpt5'.*gpt2-medium.*smollm2-135m-instruct"):
        load_model("gpt5")


def test_missing_local_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_model(str(tmp_path / "missing.gguf"))


def test_offline_hub_id_not_cached_says_use_a_local_path(hf_cache):
    with pytest.raises(ConnectionError, match="HF_HUB_OFFLINE.*not in the cache.*local path"):
        load_model("some-org/not-cached")


def test_unreachable_hub_says_use_a_local_path(tmp_path, monkeypatch):
    with socket.socket() as s:  # a port with nothing listening: connections are refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(ConnectionError, match="unreachable.*local path"):
        load_model("some-org/some-model")


def test_corrupt_safetensors_names_the_file(hf_dirs, tmp_path):
    _, directory = hf_dirs["llama"]
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    data = (directory / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{tmp_path / 'model.safetensors'}.*truncated"):
        load_model(str(tmp_path))


def test_pickle_only_repo_is_refused(hf_dirs, hf_cache, tmp_path):
    _, directory = hf_dirs["llama"]
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "config.json").write_text((directory / "config.json").read_text())
    (repo / "pytorch_model.bin").write_bytes(b"not unpickled")
    hf_cache.add("old-org/pickled", repo)
    with pytest.raises(ValueError, match="only pickle weights.*pytorch_model.bin.*safetensors"):
        load_model("old-org/pickled")


def test_truncated_gguf_names_the_file(tiny_llama, tmp_path):
    _write_gguf(tiny_llama, tmp_path / "full.gguf")
    data = (tmp_path / "full.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{tmp_path / 'cut.gguf'}.*truncated"):
        load_model(str(tmp_path / "cut.gguf"))
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all" * 100)
    with pytest.raises(ValueError, match=f"{tmp_path / 'junk.gguf'}.*corrupt"):
        load_model(str(tmp_path / "junk.gguf"))


def test_corrupt_safetensors_header_names_the_file(hf_dirs, tmp_path):
    _, directory = hf_dirs["llama"]
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(ValueError, match=f"{tmp_path / 'model.safetensors'}.*corrupt"):
        load_model(str(tmp_path))


def test_shape_mismatch_names_key_and_shapes(hf_dirs, tmp_path):
    _, directory = hf_dirs["qwen2"]
    config = json.loads((directory / "config.json").read_text())
    config["intermediate_size"] = 96
    (tmp_path / "config.json").write_text(json.dumps(config))
    os.symlink(directory / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.\w+_proj\.weight' has shape \(\d+, \d+\) "
                                         r"in the checkpoint but the model expects \(\d+, \d+\)"):
        load_model(str(tmp_path))


def test_export_refuses_tokenizer_larger_than_vocab(make_tiny_model, tiny_tokenizer, tmp_path):
    model = make_tiny_model("llama", vocab_size=256)
    with pytest.raises(ValueError, match="resize_token_embeddings"):
        save_pretrained(model, tiny_tokenizer, tmp_path / "out")


# -- resizing -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["gpt2", "llama3"])
def test_resize_token_embeddings(make_tiny_model, kind):
    model = make_tiny_model(kind)
    ids = _ids()
    with torch.no_grad():
        before = model(ids)
    old_embed = (model.transformer.wte if kind == "gpt2" else model.model.embed_tokens).weight.detach().clone()
    old_head = model.lm_head.weight.detach().clone()
    assert resize_token_embeddings(model, 330, multiple_of=64) == 384
    embed = model.transformer.wte if kind == "gpt2" else model.model.embed_tokens
    assert embed.weight.shape == (384, 64) and model.lm_head.weight.shape == (384, 64)
    assert model.config.vocab_size == 384
    assert (model.lm_head.weight is embed.weight) == (kind == "gpt2")  # tying survives
    assert torch.equal(embed.weight[:320], old_embed)
    assert torch.allclose(embed.weight[320:], old_embed.mean(0).expand(64, -1))
    assert torch.allclose(model.lm_head.weight[320:], old_head.mean(0).expand(64, -1))
    with torch.no_grad():
        assert torch.allclose(model(ids)[..., :320], before, atol=1e-6)  # old tokens unchanged
    assert resize_token_embeddings(model, 300) == 384  # never shrinks


def test_directory_without_weights(hf_dirs, tmp_path):
    _, directory = hf_dirs["llama"]
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors weights in .*never pickle"):
        load_model(str(tmp_path))


def test_tiny_model_dir_fixture_loads(tiny_model_dir, tiny_tokenizer):
    model, tokenizer = load(str(tiny_model_dir))
    assert type(model).__name__ == "Llama" and model.config.vocab_size == 320
    assert tokenizer.render_chat([{"role": "user", "content": "hi"}]) == \
        tiny_tokenizer.render_chat([{"role": "user", "content": "hi"}])
