"""LoRA, rsLoRA, DoRA (and QLoRA's errors on a CPU; QLoRA itself: test_qlora.py) through peft on the native models.

The adapter's numbers: merged logits equal adapter logits; a saved adapter loads with peft onto
transformers' own model of the same checkpoint (posttrain's export of the base) and gives the same
logits, for GPT-2 (Conv1D there, nn.Linear here) and Llama. Training: an SFT run with LoRA lowers
the val loss, its checkpoints hold the adapter only, its model/ folder is a PEFT adapter that
posttrain loads, merges and exports; no base weight of the model it trained changes; a resumed run
equals an uninterrupted one; parameter counts match a hand count. Each trainer (sft, dpo, classify)
takes every --lora.* option from the command line and applies it; DPO's reference is the policy with
its adapters off (one model in memory). Bad input gets errors that say what exists.
"""

import contextlib
import json
import math
import sys
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import torch

from posttrain import cli
from posttrain.lora import (LoraConfig, adapters_disabled, apply_lora, check_lora, is_lora_model, load_adapter,
                            merge_adapter, parameter_counts, require_bitsandbytes, resolve_targets, save_adapter)
from posttrain.runlog import read_jsonl
from posttrain.train.loop import train
from posttrain.train.losses import sft_loss
from posttrain.train import sft as sft_module
from posttrain.train.sft import DataConfig, SampleConfig, sft
from posttrain.weights import load, save_pretrained
from test_loop import Shuffled, losses, noisy_sft_loss, quiet
from test_sft import quiet_train, save_tiny_llama, write_alpaca

X = torch.tensor([[3, 17, 250, 9, 41, 8, 77, 256], [100, 2, 5, 64, 300, 12, 1, 0]])  # (2, 8) token ids


def perturb_adapters(model, seed: int = 1, scale: float = 0.1) -> None:
    """Random adapter weights (lora_B starts at zero, which would make every comparison trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(scale * torch.randn(p.shape, generator=g))


def base_state(model) -> dict[str, torch.Tensor]:
    """The base model's weights inside a LoRA model (peft's base_layer.* names), cloned."""
    return {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}


def base_weights_of(wrapped) -> dict[str, torch.Tensor]:
    """The base weights inside a peft model under the native model's own names (base_layer dropped)."""
    return {k.replace(".base_layer.", "."): v for k, v in wrapped.get_base_model().state_dict().items()
            if "lora_" not in k}


@contextlib.contextmanager
def models_in_use(trainer):
    """What a trainer's run used: {"trained": the models it handed to the loop (a spy around the trainer
    module's `train`, which still runs), "embeddings": the distinct token-embedding tables any forward
    used (a global forward hook)}. One model trained with adapters shows one table; a second copy of
    the model (say, a reference) would show a second."""
    seen: dict[str, list] = {"trained": [], "embeddings": []}
    loop_train = trainer.train

    def spy(model, *args, **kwargs):
        seen["trained"].append(model)
        return loop_train(model, *args, **kwargs)

    def hook(module, args, output):
        if isinstance(module, torch.nn.Embedding) and not any(m is module for m in seen["embeddings"]):
            seen["embeddings"].append(module)

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(trainer, "train", spy)
            yield seen
    finally:
        handle.remove()


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models compute faster on one thread than they synchronise two (much faster on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- which modules, how many parameters -----------------------------------------------------------

def test_parameter_counts_match_hand_computation(make_tiny_model, capsys):
    # GPT-2: vocab 320, 128 positions, 64 dims, 2 layers; lm_head tied to wte (counted once)
    per_layer = 2 * 64 + (64 * 192 + 192) + (64 * 64 + 64) + 2 * 64 + (64 * 256 + 256) + (256 * 64 + 64)
    base = 320 * 64 + 128 * 64 + 2 * per_layer + 2 * 64
    model = make_tiny_model("gpt2")
    assert parameter_counts(model) == (base, base)
    wrapped = apply_lora(model, LoraConfig(r=4, targets="attn"))
    adapters = 2 * ((4 * 64 + 192 * 4) + (4 * 64 + 64 * 4))  # c_attn A (4, 64) B (192, 4); c_proj A, B
    assert adapters == 3072
    assert parameter_counts(wrapped) == (adapters, base + adapters)
    out = capsys.readouterr().out
    assert f"trainable {adapters:,} of {base + adapters:,} parameters" in out and "attn.c_attn, attn.c_proj" in out

    # Llama MLP with DoRA: gate/up 64 -> 128, down 128 -> 64, plus one magnitude per output feature
    llama = make_tiny_model("llama")
    total = parameter_counts(llama)[1]
    wrapped = apply_lora(llama, LoraConfig(r=4, targets="mlp", variant="dora"))
    per_layer = 2 * (4 * 64 + 128 * 4 + 128) + (4 * 128 + 64 * 4 + 64)
    assert parameter_counts(wrapped) == (2 * per_layer, total + 2 * per_layer)


def test_target_groups_and_explicit_names(make_tiny_model):
    gpt2, llama = make_tiny_model("gpt2"), make_tiny_model("llama")
    assert resolve_targets(gpt2, "attn") == ["attn.c_attn", "attn.c_proj"]
    assert resolve_targets(gpt2, "mlp") == ["mlp.c_fc", "mlp.c_proj"]
    assert len(resolve_targets(llama, "all-linear")) == 7
    wrapped = apply_lora(llama, LoraConfig(r=2, targets="q_proj, v_proj"), verbose=False)
    adapted = sorted({n.split(".lora_A")[0].removeprefix("base_model.model.")
                      for n, _ in wrapped.named_parameters() if ".lora_A." in n})
    assert adapted == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    wrapped = apply_lora(gpt2, LoraConfig(r=2, targets=["c_proj"]), verbose=False)  # both c_proj layers
    adapted = {n.split(".lora_A")[0] for n, _ in wrapped.named_parameters() if ".lora_A." in n}
    assert len(adapted) == 4 and all(n.endswith("c_proj") for n in adapted)


def test_a_target_that_matches_nothing_lists_the_modules(make_tiny_model):
    with pytest.raises(ValueError) as e:
        apply_lora(make_tiny_model("gpt2"), LoraConfig(r=4, targets="q_proj,v_proj"))
    message = str(e.value)
    assert "'q_proj' matches no linear layer" in message
    for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj", "all-linear"):
        assert name in message
    with pytest.raises(ValueError, match="self_attn.q_proj.*mlp.gate_proj|mlp.gate_proj.*self_attn.q_proj"):
        apply_lora(make_tiny_model("llama"), LoraConfig(r=4, targets="c_attn"))


def test_a_rank_larger_than_the_layer_is_an_error(make_tiny_model):
    with pytest.raises(ValueError, match=r"lora.r 65 is too large for transformer.h.0.attn.c_attn \(64 -> 192\).*min\(in, out\) = 64"):
        apply_lora(make_tiny_model("gpt2"), LoraConfig(r=65, targets="attn"))
    # k_proj is 64 -> 32 (2 KV heads of 16): r 48 fits q_proj but not k_proj
    with pytest.raises(ValueError, match=r"k_proj \(64 -> 32\).*lora.r <= 32"):
        apply_lora(make_tiny_model("llama"), LoraConfig(r=48, targets="attn"))


@pytest.mark.parametrize("config, message", [
    (LoraConfig(r=8, variant="qlora"), "lora.variant 'qlora' is unknown; choose one of: lora, rslora, dora"),
    (LoraConfig(r=8, init="pissa"), "lora.init 'pissa' is unknown"),
    (LoraConfig(r=3, init="orthogonal"), "even rank"),
    (LoraConfig(r=8, quantize="int8"), "lora.quantize 'int8' is unknown"),
    (LoraConfig(r=-1), "lora.r must be >= 0"),
    (LoraConfig(r=8, dropout=1.0), "lora.dropout"),
    (LoraConfig(r=8, targets=" , "), "lora.targets is empty"),
])
def test_bad_options_are_named(config, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_lora(config)


@pytest.mark.parametrize("init", ["default", "gaussian", "orthogonal"])
def test_every_init_starts_as_the_base_model(make_tiny_model, init):
    base = make_tiny_model("llama").eval()
    with torch.no_grad():
        expected = base(X)
    wrapped = apply_lora(base, LoraConfig(r=4, init=init, variant="dora"), verbose=False).eval()
    a = wrapped.get_base_model().model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert a.abs().sum() > 0  # random A (orthogonal: B too, with B @ A = 0)
    with torch.no_grad():
        assert (wrapped(X) - expected).abs().max() <= 1e-5


# -- the numbers: merge, transformers --------------------------------------------------------------

@pytest.mark.parametrize("kind", ["gpt2", "llama", "llama3"])
@pytest.mark.parametrize("variant", ["lora", "rslora", "dora"])
def test_merged_logits_equal_adapter_logits(make_tiny_model, kind, variant):
    wrapped = apply_lora(make_tiny_model(kind), LoraConfig(r=4, alpha=8, variant=variant), verbose=False).eval()
    perturb_adapters(wrapped)
    with torch.no_grad():
        adapted = wrapped(X)
        with adapters_disabled(wrapped):
            base = wrapped(X)
        merged = merge_adapter(wrapped)
        assert not is_lora_model(merged) and type(merged).__name__ in ("GPT2", "Llama")
        assert all(type(m).__name__ != "Linear" or type(m).__module__ == "torch.nn.modules.linear"
                   for m in merged.modules())  # no peft layer left
        out = merged(X)
    assert (adapted - base).abs().max() > 1e-2  # the adapter does something
    assert (out - adapted).abs().max() <= 1e-5


@pytest.mark.parametrize("kind, variant", [("gpt2", "lora"), ("gpt2", "dora"), ("llama", "lora"),
                                           ("llama3", "dora")])
def test_adapter_loads_with_peft_onto_transformers_model(make_tiny_model, tiny_tokenizer, tmp_path, kind, variant):
    import peft
    import transformers

    base_dir = save_pretrained(make_tiny_model(kind), tiny_tokenizer, tmp_path / "base")
    net, _ = load(str(base_dir))
    wrapped = apply_lora(net, LoraConfig(r=4, alpha=8, variant=variant), base=str(base_dir), verbose=False).eval()
    perturb_adapters(wrapped)
    with torch.no_grad():
        ours = wrapped(X)
    adapter_dir = save_adapter(wrapped, tiny_tokenizer, tmp_path / "adapter")

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert cfg["task_type"] == "CAUSAL_LM" and cfg["peft_type"] == "LORA" and cfg["r"] == 4
    assert cfg["base_model_name_or_path"] == str(base_dir.resolve())
    assert cfg["fan_in_fan_out"] is (kind == "gpt2") and cfg["use_dora"] is (variant == "dora")
    tensors = safetensors.torch.load_file(str(adapter_dir / "adapter_model.safetensors"))
    if kind == "gpt2":  # transformers' Conv1D weight is (in, out) = (64, 192); LoRA's A and B are not transposed
        assert tensors["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (4, 64)
        assert tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"].shape == (192, 4)
        assert tensors["base_model.model.transformer.h.1.mlp.c_proj.lora_A.weight"].shape == (4, 256)
    else:
        assert tensors["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"].shape == (32, 4)
    assert all(".lora_" in k and ".default" not in k for k in tensors)

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        hf_peft = peft.PeftModel.from_pretrained(hf, str(adapter_dir)).eval()
    with torch.no_grad():
        theirs = hf_peft(input_ids=X).logits
    assert (theirs - ours).abs().max() <= 1e-5


def test_the_base_is_named_for_transformers_and_for_posttrain(tmp_path, tiny_model_dir):
    from posttrain.lora import hf_base

    assert hf_base("gpt2-medium") == ("gpt2-medium", "openai-community/gpt2-medium")
    assert hf_base("smollm2-135m-instruct") == ("smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct")
    assert hf_base("someone/model") == ("someone/model", "someone/model")
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)  # a run directory: transformers reads its model/ folder
    assert hf_base(str(run)) == (str(run.resolve()), str(run.resolve() / "model"))
    assert hf_base(str(tiny_model_dir)) == (str(tiny_model_dir.resolve()),) * 2


# -- training ----------------------------------------------------------------------------------------

def test_training_moves_adapters_only_and_checkpoints_hold_them(tmp_path, make_tiny_model):
    wrapped = apply_lora(make_tiny_model("gpt2", vocab_size=97), LoraConfig(r=4, targets="all-linear"), verbose=False)
    before, adapters = base_state(wrapped), {n: p.clone() for n, p in wrapped.named_parameters() if p.requires_grad}
    summary = train(wrapped, quiet(max_steps=6, lr=1e-2, tensorboard=False), Shuffled(), sft_loss, tmp_path / "run")
    assert summary["steps"] == 6
    after = wrapped.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), f"base weight {key} changed"
    moved = [n for n, p in wrapped.named_parameters() if p.requires_grad and not torch.equal(p, adapters[n])]
    assert len(moved) == len(adapters) == 2 * 4 * 2  # lora_A and lora_B of 4 layers in each of 2 blocks
    stored = safetensors.torch.load_file(str(tmp_path / "run/checkpoints/last/model.safetensors"))
    assert sorted(stored) == sorted(n.replace(".default", "") for n in adapters)


def test_resume_with_adapters_equals_an_uninterrupted_run(tmp_path, make_tiny_model):
    """8 steps straight vs. a crash in step 6 (checkpoint at 4) and a resume to 8; dropout on the
    adapters' input makes every step depend on the RNG that the checkpoint restores."""
    cfg = dict(max_steps=8, grad_accum=2, warmup_steps=2, schedule="cosine", weight_decay=0.1, save_every=4,
               tensorboard=False)
    lora = LoraConfig(r=4, dropout=0.1, variant="dora")

    def model(seed: int = 0):
        return apply_lora(make_tiny_model("gpt2", vocab_size=97), lora, verbose=False) if seed == 0 else \
            apply_lora(make_tiny_model("gpt2", vocab_size=97), LoraConfig(r=4, dropout=0.1, variant="dora",
                                                                          init="gaussian"), verbose=False)

    straight = model()
    train(straight, quiet(**cfg), Shuffled(), noisy_sft_loss, tmp_path / "straight")

    def crashing_loss(m, batch):
        if len(read_jsonl(tmp_path / "resumed/metrics.jsonl")) == 5:
            raise RuntimeError("simulated crash")
        return noisy_sft_loss(m, batch)

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(model(), quiet(**cfg), Shuffled(), crashing_loss, tmp_path / "resumed")
    torch.manual_seed(123)
    resumed = model(seed=1)  # other adapter weights: they come from the checkpoint
    summary = train(resumed, quiet(**cfg, resume=True), Shuffled(), noisy_sft_loss, tmp_path / "resumed")
    assert summary["resumed_from"] == 4 and summary["steps"] == 8
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name


# -- an SFT run with LoRA, end to end ---------------------------------------------------------------

LORA_STEPS, LORA_EVAL_EVERY = 24, 8


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_tokenizer):
    """One LoRA SFT run of a tiny Llama on alpaca records (shared by the tests below)."""
    root = tmp_path_factory.mktemp("lora")
    base_dir = save_tiny_llama(tiny_tokenizer, root / "tiny-llama")
    # Token embeddings at a trained model's scale (std 0.12, not init's 0.02): LoRA leaves them and the
    # final norm frozen, and with init-sized rows no logit could move far from uniform.
    base, _ = load(str(base_dir))
    with torch.no_grad():
        base.model.embed_tokens.weight.mul_(6.0)
    save_pretrained(base, tiny_tokenizer, base_dir)
    data = DataConfig(path=str(write_alpaca(root / "alpaca.json")), style="alpaca", batching="packed",
                      batch_size=4, max_length=256, split=(0.75, 0.0, 0.25), cache=False)
    train_config = quiet_train(lr=1e-2, warmup_steps=0, schedule="constant", max_steps=LORA_STEPS,
                               eval_every=LORA_EVAL_EVERY, eval_on_start=True, log_every=1)
    with models_in_use(sft_module) as seen:
        summary = sft(model=str(base_dir), data=data, train=train_config,
                      samples=SampleConfig(prompts=1, max_new_tokens=4),
                      lora=LoraConfig(r=8, alpha=16, dropout=0.0, targets="all-linear"), run_dir=str(root / "run"))
    assert len(seen["trained"]) == 1 and is_lora_model(seen["trained"][0])
    return root / "run", base_dir, summary, base_weights_of(seen["trained"][0])


def test_lora_sft_lowers_val_loss_and_saves_an_adapter(lora_run):
    run_dir, base_dir, summary, trained_base = lora_run
    val = {r["step"]: r["val_loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "val_loss" in r}
    assert sorted(val) == list(range(0, LORA_STEPS + 1, LORA_EVAL_EVERY))  # step 0: the base model
    assert val[LORA_STEPS] < val[0] - 2 and val[LORA_STEPS] < math.log(320) - 1, val
    # every base weight of the model the run trained is bit for bit the one it loaded
    original = load(str(base_dir))[0].state_dict()
    assert sorted(trained_base) == sorted(original)
    for key, value in original.items():
        assert torch.equal(trained_base[key], value), f"base weight {key} changed"
    model_dir = run_dir / "model"
    names = {p.name for p in model_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "posttrain_adapter.json", "posttrain.json",
            "tokenizer.json"} <= names
    assert not names & {"model.safetensors", "config.json"}  # no copy of the base
    meta = json.loads((model_dir / "posttrain_adapter.json").read_text())
    assert meta["base_model"] == str(base_dir.resolve())
    # checkpoints: the adapter only (7 linear layers x 2 blocks x lora_A, lora_B)
    for which in ("last", "best"):
        stored = safetensors.torch.load_file(str(run_dir / "checkpoints" / which / "model.safetensors"))
        assert len(stored) == 28 and all(".lora_A." in k or ".lora_B." in k for k in stored)
    import yaml
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["lora"]["r"] == 8


def test_a_lora_run_loads_merged_and_merges_to_a_plain_directory(lora_run, tmp_path, capsys):
    import transformers

    run_dir, base_dir, _, _ = lora_run
    merged, tokenizer = load(str(run_dir))  # base + adapter, merged
    assert type(merged).__name__ == "Llama" and not is_lora_model(merged) and len(tokenizer) == 259
    adapted = load_adapter(run_dir / "model", merge=False)
    base, _ = load(str(base_dir))
    # Trained, this tiny model amplifies fp32 rounding: its own fp32 and fp64 logits differ by ~1e-4
    # (the 1e-5 bound holds in test_merged_logits_equal_adapter_logits); a wrong merge is off by >0.1.
    tolerance = 1e-3
    with torch.no_grad():
        ref = adapted(X)
        assert (merged(X) - ref).abs().max() <= tolerance
        assert (base(X) - ref).abs().max() > 0.1  # training changed the model

    cli.main(["merge", str(run_dir), str(tmp_path / "merged")])
    assert "merged the adapter" in capsys.readouterr().out
    out = tmp_path / "merged"
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert json.loads((out / "posttrain.json").read_text())["prompt_style"] == "alpaca"
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        assert (hf(input_ids=X).logits - ref).abs().max() <= tolerance

    cli.main(["export", str(run_dir), str(tmp_path / "exported")])  # export of a LoRA run: merged too
    again, _ = load(str(tmp_path / "exported"))
    with torch.no_grad():
        assert (again(X) - ref).abs().max() <= tolerance


def test_generate_answers_from_a_lora_run_in_its_prompt_style(lora_run, capsys):
    from posttrain.generate import generate_command

    run_dir, _, _, _ = lora_run
    final = [s for s in read_jsonl(run_dir / "samples.jsonl") if s["step"] == LORA_STEPS]
    capsys.readouterr()
    generate_command(str(run_dir), final[0]["prompt"], max_new_tokens=4, chat=True)  # alpaca, from posttrain.json
    assert capsys.readouterr().out == final[0]["response"] + "\n"


def test_merge_of_a_full_model_run_says_to_export(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["merge", str(tiny_model_dir), str(tmp_path / "out")])
    assert exit_info.value.code == 1
    assert "no LoRA adapter there" in capsys.readouterr().err


# -- QLoRA on a CPU, and LoRA with new special tokens --------------------------------------------------

def test_qlora_on_a_cpu_is_a_clear_error_before_loading(tmp_path, capsys):
    args = ["sft", "--model", str(tmp_path / "not-loaded"), "--lora.r", "8", "--lora.quantize", "nf4",
            "--train.device", "cpu", "--run_dir", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "lora.quantize (QLoRA) needs a CUDA GPU" in err and "this run is on cpu" in err
    assert not (tmp_path / "run" / "config.yaml").exists()


@pytest.mark.parametrize("command", ["dpo", "classify"])
def test_qlora_on_a_cpu_is_refused_by_every_trainer(tmp_path, make_tiny_model, command):
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        apply_lora(make_tiny_model("gpt2"), LoraConfig(r=4, quantize="nf4"), device="cpu")
    args = [command, "--model", str(tmp_path / "not-loaded"), "--lora.r", "8", "--lora.quantize", "nf4",
            "--train.device", "cpu", "--run_dir", str(tmp_path / "run"), "--data.path", str(tmp_path / "none.json")]
    with pytest.raises(ValueError, match="lora.quantize \\(QLoRA\\) needs a CUDA GPU"):
        cli.run(args)


def test_qlora_without_bitsandbytes_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what `import bitsandbytes` meets where it is missing
    with pytest.raises(ValueError, match="needs bitsandbytes, which is not installed.*pip install bitsandbytes"):
        require_bitsandbytes()


def test_lora_with_a_style_that_adds_tokens_is_refused(tmp_path, gpt2_tokenizer):
    from posttrain.models.gpt2 import GPT2Config
    from posttrain.models.registry import build_model

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(gpt2_tokenizer), n_positions=256, n_embd=32, n_layer=1, n_head=2)
    model_dir = save_pretrained(build_model(config), gpt2_tokenizer, tmp_path / "tiny-gpt2")
    data = DataConfig(path=str(write_alpaca(tmp_path / "a.json", n=12)), style="chatml", batch_size=4,
                      max_length=128, split=(0.75, 0.0, 0.25), cache=False)
    with pytest.raises(ValueError, match="chatml adds special tokens.*LoRA keeps the token embeddings frozen"):
        sft(model=str(model_dir), data=data, train=quiet_train(max_steps=1), lora=LoraConfig(r=4),
            run_dir=str(tmp_path / "run"))


# -- DPO: the reference is the base with the adapters switched off ------------------------------------

def test_the_dpo_reference_is_the_base_without_a_copy(tiny_tokenizer, tmp_path):
    """base_model_reference gives the untouched base's log-probs after the adapters trained, from the
    one model in memory (peft's disable_adapter), while the policy's own log-probs moved."""
    from test_dpo import tiny_llama

    from posttrain.data.preferences import PairLoader, PreferencePairs, tokenize_pairs
    from posttrain.data.formats import Preference
    from posttrain.lora import base_model_reference
    from posttrain.prompts import get_style
    from posttrain.train.dpo import PreferenceLossConfig, preference_loss_fn, sequence_logps
    from posttrain.train.loop import forward_backward

    from posttrain.tokenizer import Tokenizer

    tiny_tokenizer.save(tmp_path)  # a private copy: rendering caches a jinja template in the shared one, and
    tokenizer = Tokenizer.from_dir(tmp_path)  # test_dpo deep-copies that one (templates cannot be)
    style = get_style("template", tokenizer, "response")
    prefs = [Preference([{"role": "user", "content": f"Q{i}"}], [{"role": "assistant", "content": "yes " * (i + 1)}],
                        [{"role": "assistant", "content": "no" * (i + 1)}]) for i in range(4)]
    pairs = PreferencePairs(tokenize_pairs(prefs, style, max_length=64), [p.prompt for p in prefs])
    batch = next(PairLoader(pairs, "padding", 4, 64, tokenizer.pad_id, shuffle=False).epoch(0))
    original = tiny_llama(tiny_tokenizer)
    policy = apply_lora(tiny_llama(tiny_tokenizer), LoraConfig(r=4, dropout=0.0), verbose=False)
    reference = base_model_reference(policy, lambda m, b: sequence_logps(m, b)[0])
    assert [c.cell_contents for c in reference.__closure__ if isinstance(c.cell_contents, torch.nn.Module)] == [policy]
    loss_fn = preference_loss_fn(PreferenceLossConfig(), reference)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    first = None
    for _ in range(5):
        loss, _, _ = forward_backward(policy, [batch], loss_fn, 4, torch.device("cpu"))
        first = loss.item() if first is None else first
        optimizer.step()
        optimizer.zero_grad()
    assert first == pytest.approx(math.log(2), abs=1e-5) and loss.item() < first - 0.05  # starts at the reference
    with torch.no_grad():
        base_logps = sequence_logps(original, batch)[0]
        assert torch.allclose(reference(batch), base_logps, atol=1e-5)
        assert (sequence_logps(policy, batch)[0] - base_logps).abs().max() > 1e-2


@pytest.fixture(scope="module")
def dpo_setup(tmp_path_factory, tiny_tokenizer):
    from test_dpo import preference_records, tiny_llama

    root = tmp_path_factory.mktemp("lora-dpo")
    prefs = root / "prefs.json"
    prefs.write_text(json.dumps(preference_records()))
    return save_pretrained(tiny_llama(tiny_tokenizer), tiny_tokenizer, root / "tiny"), prefs


@pytest.fixture(scope="module")
def dpo_runs(dpo_setup, tmp_path_factory):
    """A LoRA DPO run per reference mode: cached (computed once, adapters off) and memory (every batch)."""
    from posttrain.train.dpo import PreferenceDataConfig, PreferenceLossConfig, PreferenceSampleConfig, ReferenceConfig, dpo
    from test_dpo import quiet as dpo_quiet

    model_dir, prefs = dpo_setup
    runs = {}
    for mode in ("cached", "memory"):
        run_dir = tmp_path_factory.mktemp("runs") / mode
        runs[mode] = run_dir, dpo(str(model_dir), PreferenceDataConfig(path=str(prefs), val_path=str(prefs),
                                                                       batch_size=4, max_length=128, cache=False),
                                  PreferenceLossConfig(type="sigmoid", beta=0.1), ReferenceConfig(mode=mode),
                                  dpo_quiet(max_steps=8, lr=1e-2), PreferenceSampleConfig(prompts=1, max_new_tokens=4),
                                  lora=LoraConfig(r=8, dropout=0.0), run_dir=str(run_dir))
    return runs


def test_lora_dpo_learns_from_the_base_as_reference_in_both_modes(dpo_runs):
    for mode, (run_dir, summary) in dpo_runs.items():
        before, after = summary["val_before"], summary["val"]
        assert before["val_loss"] == pytest.approx(math.log(2), abs=1e-5), mode  # policy == reference at step 0
        assert after["val_loss"] < 0.5 and after["val_rewards/accuracies"] > 0.9, (mode, after)
        assert (run_dir / "model" / "adapter_config.json").is_file() and not (run_dir / "model" / "config.json").exists()
        stored = safetensors.torch.load_file(str(run_dir / "checkpoints" / "last" / "model.safetensors"))
        assert stored and all(".lora_" in k for k in stored)
    # the same reference either way: cached (adapters off, once) and in memory (adapters off, per batch)
    cached, memory = dpo_runs["cached"][1]["val"], dpo_runs["memory"][1]["val"]
    assert memory == pytest.approx(cached, rel=1e-4, abs=1e-4)


def test_a_lora_dpo_run_loads_merged(dpo_runs, dpo_setup):
    run_dir, _ = dpo_runs["cached"]
    merged, tokenizer = load(str(run_dir))
    base, _ = load(str(dpo_setup[0]))
    assert type(merged).__name__ == "Llama" and len(tokenizer) == 259
    with torch.no_grad():
        assert (merged(X) - base(X)).abs().max() > 1e-3


# -- classification: adapters on the blocks, the new head in full --------------------------------------

def test_lora_classification_trains_adapters_and_head_and_saves_the_merged_classifier(tiny_tokenizer, tmp_path):
    from test_classify import quick_train, save_tiny, separable_records, write_jsonl

    from posttrain.predict import Classifier
    from posttrain.train.classify import ClassifyDataConfig, EvalConfig, HeadConfig, classify

    model_dir = save_tiny("gpt2", tiny_tokenizer, tmp_path / "tiny-gpt2")
    path = write_jsonl(tmp_path / "data.jsonl", separable_records(200))
    run = tmp_path / "run"
    summary = classify(str(model_dir), ClassifyDataConfig(path=str(path), max_length=64), HeadConfig(),
                       quick_train(epochs=2, lr=1e-2), EvalConfig(), lora=LoraConfig(r=4, dropout=0.0),
                       run_dir=str(run))
    assert summary["test_accuracy"] >= 0.95 and summary["test_accuracy_before"] < 0.9, summary
    adapters = 2 * ((4 * 64 + 192 * 4) + (4 * 64 + 64 * 4) + (4 * 64 + 256 * 4) + (4 * 256 + 64 * 4))
    assert summary["trainable_parameters"] == adapters + 2 * 64  # and the head Linear(64, 2)
    import yaml
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["head"]["trainable"] == "lora" and config["lora"]["r"] == 4
    stored = safetensors.torch.load_file(str(run / "checkpoints" / "best" / "model.safetensors"))
    assert sorted(k for k in stored if ".lora_" not in k) == ["base_model.model.lm_head.weight"]
    assert stored["base_model.model.lm_head.weight"].shape == (2, 64)
    # model/ is a plain classifier: predict reproduces the run's test accuracy
    classifier = Classifier.load(str(run), device="cpu")
    predictions = read_jsonl(run / "test_predictions.jsonl")
    labels = [p["label"] for p in classifier.predict([p["text"] for p in predictions])]
    assert labels == [p["prediction"] for p in predictions]


def test_head_trainable_lora_needs_a_rank(tmp_path):
    from posttrain.train.classify import ClassifyDataConfig, HeadConfig, classify

    with pytest.raises(ValueError, match="head.trainable lora needs adapters.*--lora.r"):
        classify("no/such-model", ClassifyDataConfig(), HeadConfig(trainable="lora"), run_dir=str(tmp_path / "r"))


# -- every trainer takes the --lora.* options from the command line and applies them ------------------

LORA_ARGS = ["--lora.r", "2", "--lora.alpha", "6", "--lora.dropout", "0.2", "--lora.targets", "q_proj,v_proj",
             "--lora.init", "gaussian"]
QUICK_ARGS = ["--train.max_steps", "3", "--train.lr", "5e-2", "--train.device", "cpu", "--train.progress", "false",
              "--train.tensorboard", "false"]


def lora_parameters(variant: str) -> int:
    """By hand, for r 2 on q_proj (64 -> 64) and v_proj (64 -> 32) of the tiny Llama's 2 blocks: A (2, in)
    and B (out, 2) each, and with DoRA one magnitude per output feature."""
    per_block = (2 * 64 + 64 * 2) + (2 * 64 + 32 * 2) + ((64 + 32) if variant == "dora" else 0)
    return 2 * per_block


def assert_lora_applied(out: str, variant: str, run_dir: Path, extra_trainable: int = 0) -> None:
    """The start-of-run summary and the checkpoint show the options (rank, targets, variant) at work."""
    assert (f"LoRA ({variant}, r 2, alpha 6, dropout 0.2, init gaussian) on q_proj, v_proj: "
            f"trainable {lora_parameters(variant) + extra_trainable:,} of") in out
    stored = safetensors.torch.load_file(str(run_dir / "checkpoints" / "last" / "model.safetensors"))
    adapted = {k.split(".lora_")[0].removeprefix("base_model.model.") for k in stored if ".lora_" in k}
    assert adapted == {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")}
    assert stored["base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"].shape == (2, 64)
    assert any("lora_magnitude_vector" in k for k in stored) is (variant == "dora")


def assert_adapter_config(model_dir: Path, variant: str) -> None:
    """adapter_config.json is peft's config of the model that trained: every option as given."""
    cfg = json.loads((model_dir / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"]) == (2, 6, 0.2)
    assert sorted(cfg["target_modules"]) == ["q_proj", "v_proj"] and cfg["init_lora_weights"] == "gaussian"
    assert (cfg["use_rslora"], cfg["use_dora"]) == (variant == "rslora", variant == "dora")


def test_sft_applies_the_lora_options(tmp_path, tiny_tokenizer, capsys):
    model_dir = save_tiny_llama(tiny_tokenizer, tmp_path / "tiny-llama")
    run_dir = tmp_path / "run"
    args = ["sft", "--model", str(model_dir), "--data.path", str(write_alpaca(tmp_path / "a.json", n=16)),
            "--data.style", "alpaca", "--data.batch_size", "4", "--data.max_length", "256", "--data.cache", "false",
            "--samples.prompts", "1", "--samples.max_new_tokens", "2", *LORA_ARGS, "--lora.variant", "dora",
            *QUICK_ARGS, "--run_dir", str(run_dir)]
    with models_in_use(sft_module) as seen:
        cli.run(args)
    assert_lora_applied(capsys.readouterr().out, "dora", run_dir)
    assert_adapter_config(run_dir / "model", "dora")
    trained_base, original = base_weights_of(seen["trained"][0]), load(str(model_dir))[0].state_dict()
    assert len(seen["trained"]) == 1 and all(torch.equal(trained_base[k], v) for k, v in original.items())


def test_dpo_applies_the_lora_options_and_keeps_one_model(tmp_path, tiny_tokenizer, capsys):
    """--reference.mode memory with LoRA: the reference is the same model with its adapters off, so only
    one embedding table ever runs (a frozen copy would be a second)."""
    from test_dpo import preference_records, tiny_llama

    import posttrain.train.dpo as dpo_module

    model_dir = save_pretrained(tiny_llama(tiny_tokenizer), tiny_tokenizer, tmp_path / "tiny-llama")
    prefs = tmp_path / "prefs.json"
    prefs.write_text(json.dumps(preference_records(8)))
    run_dir = tmp_path / "run"
    args = ["dpo", "--model", str(model_dir), "--data.path", str(prefs), "--data.val_path", str(prefs),
            "--data.batch_size", "4", "--data.max_length", "128", "--data.cache", "false", "--reference.mode", "memory",
            "--samples.prompts", "1", "--samples.max_new_tokens", "2", *LORA_ARGS, "--lora.variant", "rslora",
            *QUICK_ARGS, "--run_dir", str(run_dir)]
    with models_in_use(dpo_module) as seen:
        summary = cli.run(args)
    assert_lora_applied(capsys.readouterr().out, "rslora", run_dir)
    assert_adapter_config(run_dir / "model", "rslora")
    assert len(seen["trained"]) == 1 and len(seen["embeddings"]) == 1
    assert summary["val"]["val_loss"] < math.log(2)  # the policy moved away from the reference
    trained_base, original = base_weights_of(seen["trained"][0]), load(str(model_dir))[0].state_dict()
    assert all(torch.equal(trained_base[k], v) for k, v in original.items())
    # Dropout off (as TRL's DPO): in training mode the policy's log-probs are a function of the weights
    # alone, like the reference's, though --lora.dropout asked for 0.2.
    policy, ids = seen["trained"][0].train(), torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        assert torch.equal(policy(ids), policy(ids))


def test_classify_applies_the_lora_options(tmp_path, tiny_tokenizer, capsys):
    """The saved classifier is the base with exactly these adapters merged: rebuilt from the run's last
    checkpoint with the same options it matches, with another alpha or variant it does not."""
    from test_classify import save_tiny, separable_records, write_jsonl

    from posttrain.models.heads import add_classification_head
    from posttrain.predict import Classifier
    from posttrain.weights.checkpoint import load_checkpoint

    model_dir = save_tiny("llama", tiny_tokenizer, tmp_path / "tiny-llama")
    run_dir = tmp_path / "run"
    args = ["classify", "--model", str(model_dir), "--data.path", str(write_jsonl(tmp_path / "d.jsonl",
                                                                                  separable_records(40))),
            "--data.max_length", "64", "--evaluation.final", "last", *LORA_ARGS, "--lora.variant", "rslora",
            *QUICK_ARGS, "--run_dir", str(run_dir)]
    cli.run(args)
    assert_lora_applied(capsys.readouterr().out, "rslora", run_dir, extra_trainable=2 * 64)  # + the head
    saved = Classifier.load(str(run_dir), device="cpu").model

    def rebuilt(alpha: float, variant: str):
        torch.manual_seed(0)
        base = load(str(model_dir))[0]
        add_classification_head(base, 2)
        wrapped = apply_lora(base, LoraConfig(r=2, alpha=alpha, dropout=0.2, targets="q_proj,v_proj", variant=variant),
                             modules_to_save=["lm_head"], verbose=False)
        load_checkpoint(run_dir / "checkpoints" / "last", wrapped, restore_rng=False)
        return merge_adapter(wrapped).eval()

    with torch.no_grad():
        expected = saved(X)
        assert (rebuilt(6, "rslora")(X) - expected).abs().max() <= 1e-5
        assert (rebuilt(16, "rslora")(X) - expected).abs().max() > 1e-4
        assert (rebuilt(6, "lora")(X) - expected).abs().max() > 1e-4
