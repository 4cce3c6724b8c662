"""Native models against transformers' with the same weights, document masking and the KV cache."""

import pytest
import torch
from transformers import GPT2Config as HFGPT2Config
from transformers import GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM
from transformers import LlamaConfig as HFLlamaConfig
from transformers import Qwen2Config as HFQwen2Config

from posttrain.models.gpt2 import CONV1D_SUFFIXES, GPT2, GPT2Config
from posttrain.models.llama import Llama, LlamaConfig
from posttrain.models.registry import PRESETS, build_model, config_from_hf

VOCAB = 97
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 16}


def tiny_pair(family: str):
    """(hf_model, native_model) with identical random weights."""
    torch.manual_seed(0)
    if family == "gpt2":
        hf = GPT2LMHeadModel(HFGPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64,
                                          bos_token_id=0, eos_token_id=0))
        native = GPT2(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64))
        state = {k: v.t() if k.endswith(CONV1D_SUFFIXES) else v for k, v in hf.state_dict().items()
                 if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    else:
        common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=1, eos_token_id=2)
        hf = {
            "llama": lambda: LlamaForCausalLM(HFLlamaConfig(**common)),
            "llama3-untied-bias": lambda: LlamaForCausalLM(HFLlamaConfig(
                **common, rope_scaling=LLAMA3_SCALING, rope_theta=500000.0, tie_word_embeddings=False,
                attention_bias=True)),
            "qwen2": lambda: Qwen2ForCausalLM(HFQwen2Config(**common, tie_word_embeddings=True)),
        }[family]()
        native = Llama(config_from_hf(hf.config.to_dict()))
        state = hf.state_dict()
        # transformers initialises biases to zero; make them count in the comparison
        with torch.no_grad():
            for name, p in hf.named_parameters():
                if name.endswith(".bias"):
                    p.normal_()
    native.load_state_dict(state, strict=True)
    return hf.eval(), native.eval()


FAMILIES = ["gpt2", "llama", "llama3-untied-bias", "qwen2"]


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_transformers(family):
    hf, native = tiny_pair(family)
    x = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        diff = (hf(x).logits - native(x)).abs().max().item()
    assert diff <= 1e-4


def test_qwen2_has_qkv_bias_but_no_output_bias():
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, model_type="qwen2")
    attn = Llama(cfg).model.layers[0].self_attn
    assert attn.q_proj.bias is not None and attn.k_proj.bias is not None and attn.v_proj.bias is not None
    assert attn.o_proj.bias is None


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_matches_full_forward(family):
    _, model = tiny_pair(family)
    x = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(batch=2, max_len=16)
        prefill = model(x[:, :8], cache=cache)
        steps = [model(x[:, t:t + 1], cache=cache) for t in range(8, 12)]
    incremental = torch.cat([prefill] + steps, dim=1)
    assert cache.length == 12
    assert (incremental - full).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_documents_do_not_attend_to_each_other(family):
    """Two documents in one row, with their own positions, give the logits of each run alone."""
    _, model = tiny_pair(family)
    a, b = torch.randint(0, VOCAB, (1, 7)), torch.randint(0, VOCAB, (1, 5))
    packed = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(7), torch.arange(5)])[None]
    documents = torch.tensor([[0] * 7 + [1] * 5])
    with torch.no_grad():
        together = model(packed, position_ids=positions, document_ids=documents)
        alone = torch.cat([model(a), model(b)], dim=1)
    assert (together - alone).abs().max().item() <= 1e-5


def test_left_padded_generation_step_ignores_pads():
    """A left-padded prompt (pads in document -1) decodes as if the pads were not there."""
    _, model = tiny_pair("llama")
    prompt = torch.randint(3, VOCAB, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), prompt], dim=1)
    docs = torch.tensor([[-1] * 3 + [0] * 6])
    positions = torch.tensor([[0, 0, 0, 0, 1, 2, 3, 4, 5]])
    nxt = torch.randint(3, VOCAB, (1, 1))
    with torch.no_grad():
        cache = model.new_cache(1, 12)
        model(padded, position_ids=positions, document_ids=docs, cache=cache)
        step = model(nxt, position_ids=torch.tensor([[6]]), cache=cache)
        reference = model(torch.cat([prompt, nxt], dim=1))[:, -1:]
    assert (step - reference).abs().max().item() <= 1e-5


def test_llama3_rope_scaling_changes_only_low_frequencies():
    plain = Llama(LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1,
                              intermediate_size=32, vocab_size=VOCAB, rope_theta=500000.0))
    scaled = Llama(LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1,
                               intermediate_size=32, vocab_size=VOCAB, rope_theta=500000.0,
                               rope_scaling={**LLAMA3_SCALING, "original_max_position_embeddings": 8192}))
    assert torch.equal(plain.inv_freq[:2], scaled.inv_freq[:2])  # high frequencies untouched
    assert torch.allclose(scaled.inv_freq[-1], plain.inv_freq[-1] / 8.0)  # lowest divided by the factor


def test_config_round_trips_through_hf_dict():
    for alias in ("gpt2-medium", "smollm2-135m", "llama-3.2-1b", "qwen2.5-0.5b"):
        config = PRESETS[alias].config
        assert config_from_hf(config.to_hf()) == config


# The parameter counts of the hub checkpoints (model.safetensors, tied embeddings counted once).
PRESET_PARAMETERS = {
    "gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080, "gpt2-xl": 1_557_611_200,
    "smollm2-135m": 134_515_008, "smollm2-360m": 361_821_120, "smollm2-1.7b": 1_711_376_384,
    "llama-3.2-1b": 1_235_814_400, "llama-3.2-3b": 3_212_749_824,
    "qwen2.5-0.5b": 494_032_768, "qwen2.5-1.5b": 1_543_714_304,
}


@pytest.mark.parametrize("alias", sorted(PRESET_PARAMETERS))
def test_preset_parameter_counts(alias):
    with torch.device("meta"):
        model = build_model(PRESETS[alias].config)
    assert sum(p.numel() for p in model.parameters()) == PRESET_PARAMETERS[alias]
    if not alias.startswith("gpt2"):  # each Llama-family base has its instruct sibling, same architecture
        instruct = PRESETS[f"{alias}-instruct"]
        assert instruct.config == PRESETS[alias].config and instruct.hub_id == PRESETS[alias].hub_id + "-Instruct"
