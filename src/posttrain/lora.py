"""LoRA, rsLoRA, DoRA and QLoRA for every trainer, through peft on the native models.

    net = apply_lora(net, LoraConfig(r=8, targets="all-linear"), base="gpt2-medium")  # a peft PeftModel
    train(net, ..., trainable_params=trainable_parameters(net))  # adapters only (+ modules_to_save)
    save_adapter(net, tokenizer, "runs/x/model")     # adapter_config.json + adapter_model.safetensors
    merged = merge_adapter(net)                      # peft's merge_and_unload: the native model again

No LoRA layer is written here: peft wraps the native nn.Linear modules. Since those carry Hugging
Face's names (transformer.h.0.attn.c_attn, model.layers.0.self_attn.q_proj, ...), an adapter saved
here has the keys peft writes for transformers' own model of the same checkpoint
(base_model.model.transformer.h.0.attn.c_attn.lora_A.weight) and loads onto it with
`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), run_dir / "model")`.

GPT-2: transformers keeps c_attn/c_proj/c_fc as Conv1D, weight (in, out); here they are nn.Linear,
weight (out, in). LoRA's A (r, in) and B (out, r) are the same for both (peft builds its lora_A/B
from the layer's in/out features and only transposes the merged delta B @ A for Conv1D), so the
tensors are written unchanged and only adapter_config.json says fan_in_fan_out: true, which is what
peft needs for transformers' Conv1D (training here uses fan_in_fan_out: false, for nn.Linear).

The variants: lora (scale alpha / r), rslora (alpha / sqrt(r), Kalajdzievski 2023), dora
(magnitude and direction, Liu et al. 2024). QLoRA (Dettmers et al. 2023): `quantize: nf4` turns
every linear layer of the blocks into a bitsandbytes 4-bit layer (CUDA only) and keeps the
adapters, embeddings, norms and head in bf16. Merging always starts from the base in full
precision (the run's adapter is reloaded onto it), never from the 4-bit copy.
tests/test_qlora.py runs this path on the CPU (bitsandbytes' CPU backend, the CUDA guard lifted):
the refusal on a CPU is a choice for users, not a limit of the code.

A run's `model/` folder then holds the adapter (PEFT format), the tokenizer, posttrain.json (prompt
style) and posttrain_adapter.json (what posttrain loads the base from); `posttrain.weights.load`
reads it as base + adapter, merged; `posttrain merge RUN OUT` writes the merged model as a plain
Hugging Face directory. Training checkpoints hold the adapter (and a classifier's head) only. A
classification run trains its new head in full beside the adapters (peft's modules_to_save) and
saves the merged classifier.

peft is imported where it is used (it takes seconds), so importing this module stays light.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from posttrain.models.gpt2 import GPT2Config
from posttrain.models.heads import register_trainable_policy

VARIANTS = ("lora", "rslora", "dora")
INITS = ("default", "gaussian", "orthogonal")
QUANTIZE = ("nf4", "fp4")
GROUPS = ("attn", "mlp", "all-linear")
# The linear layers of each family, as suffixes of their module names (peft matches `name` or `*.name`).
FAMILY_TARGETS = {
    "gpt2": {"attn": ["attn.c_attn", "attn.c_proj"], "mlp": ["mlp.c_fc", "mlp.c_proj"]},
    "llama": {"attn": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
              "mlp": ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]},
}
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
BASE_FILE = "posttrain_adapter.json"  # beside the adapter: the base as posttrain loads it
ADAPTER_NAME = "default"  # peft's name for a model's only adapter


@dataclass
class LoraConfig:
    """Low-rank adapters (peft) on the model's linear layers; the base weights stay frozen.

    Attributes:
        r: rank of each update; 0: LoRA off (full fine-tuning). At most min(in, out) of every target layer.
        alpha: the update is scaled by alpha / r (rslora: alpha / sqrt(r)).
        dropout: dropout on the adapters' input, during training only.
        targets: attn | mlp | all-linear (both), or module names, comma-separated or a list: full names
            or their ends (q_proj,v_proj; attn.c_attn; mlp.c_fc). A name that matches no layer is an error
            that lists the layers there are.
        variant: lora | rslora (rank-stabilised scale alpha / sqrt(r)) | dora (weight-decomposed: a
            trained magnitude per output feature beside the low-rank direction).
        init: default (A Kaiming-uniform, B zero) | gaussian (A normal, B zero) | orthogonal (A and B
            orthogonal with B @ A = 0; even r): every init starts as the base model.
        quantize: nf4 | fp4: QLoRA, the base's linear layers in 4-bit (bitsandbytes, CUDA only), the
            adapters in bf16; unset: the base in full precision.
    """

    r: int = 0
    alpha: float = 16.0
    dropout: float = 0.05
    targets: str | list[str] = "all-linear"
    variant: str = "lora"
    init: str = "default"
    quantize: str | None = None

    @property
    def enabled(self) -> bool:
        return self.r > 0


def check_lora(config: LoraConfig, device: torch.device | str | None = None) -> None:
    """Raise ValueError when an option is out of range (before any model is loaded); with the training
    `device`, also when QLoRA cannot run there (no CUDA, no bitsandbytes)."""
    if config.r < 0:
        raise ValueError(f"lora.r must be >= 0 (0: LoRA off), got {config.r}")
    if not config.enabled:
        return
    choices = [("lora.variant", config.variant, VARIANTS), ("lora.init", config.init, INITS)]
    for key, value, allowed in choices:
        if value not in allowed:
            raise ValueError(f"{key} {value!r} is unknown; choose one of: {', '.join(allowed)}")
    if config.quantize is not None and config.quantize not in QUANTIZE:
        raise ValueError(f"lora.quantize {config.quantize!r} is unknown; choose one of: {', '.join(QUANTIZE)} "
                         f"(or leave it unset for plain LoRA)")
    if config.alpha <= 0:
        raise ValueError(f"lora.alpha must be positive, got {config.alpha}")
    if not 0 <= config.dropout < 1:
        raise ValueError(f"lora.dropout must be in [0, 1), got {config.dropout}")
    if config.init == "orthogonal" and config.r % 2:
        raise ValueError(f"lora.init orthogonal needs an even rank, got lora.r {config.r}")
    if not target_names(config.targets):
        raise ValueError("lora.targets is empty: name attn, mlp, all-linear or module names such as q_proj,v_proj")
    if config.quantize is not None and device is not None:
        require_cuda_for_qlora(device)
        require_bitsandbytes()


# ----------------------------------------------------------------------------------------------
# Which modules get adapters

def family(model: nn.Module) -> str:
    return "gpt2" if isinstance(model.config, GPT2Config) else "llama"


def target_names(targets: str | list[str] | tuple[str, ...]) -> list[str]:
    """The names of `targets`: a comma-separated string or a list."""
    items = targets.split(",") if isinstance(targets, str) else list(targets)
    return [t.strip() for t in items if t and t.strip()]


def linear_modules(model: nn.Module) -> dict[str, nn.Linear]:
    """The linear layers LoRA may adapt: every nn.Linear of the blocks (not the LM or classification head)."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.split(".")[-1] != "lm_head"}


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)  # peft's rule for a list of target names


def resolve_targets(model: nn.Module, targets: str | list[str]) -> list[str]:
    """peft target_modules for `targets` (groups expanded); each name must match a linear layer.

    A name that matches none raises ValueError listing the names that exist.
    """
    groups = FAMILY_TARGETS[family(model)]
    linears = linear_modules(model)
    out: list[str] = []
    for name in target_names(targets):
        if name == "all-linear":
            expanded = groups["attn"] + groups["mlp"]
        elif name in groups:
            expanded = groups[name]
        else:
            if not any(_matches(m, name) for m in linears):
                short = sorted({".".join(m.split(".")[-2:]) for m in linears})
                leaves = sorted({m.split(".")[-1] for m in linears})
                raise ValueError(f"lora.targets: {name!r} matches no linear layer of this {type(model).__name__}. "
                                 f"Its linear layers are {', '.join(short)} (leaf names: {', '.join(leaves)}); "
                                 f"or use a group: {', '.join(GROUPS)}")
            expanded = [name]
        out += [t for t in expanded if t not in out]
    return out


def check_rank(model: nn.Module, targets: list[str], r: int) -> None:
    """A rank above min(in, out) of a layer is no low-rank update: say which layer and the largest r."""
    for name, m in linear_modules(model).items():
        if any(_matches(name, t) for t in targets) and r > min(m.in_features, m.out_features):
            raise ValueError(f"lora.r {r} is too large for {name} ({m.in_features} -> {m.out_features}): the "
                             f"rank of its update is at most min(in, out) = {min(m.in_features, m.out_features)}. "
                             f"Choose lora.r <= {min(m.in_features, m.out_features)} or other lora.targets")


# ----------------------------------------------------------------------------------------------
# Wrapping, parameters, adapters off

def peft_config(config: LoraConfig, targets: list[str], modules_to_save: list[str] | None = None):
    """peft's LoraConfig for the native model (nn.Linear everywhere: fan_in_fan_out false)."""
    import peft

    return peft.LoraConfig(
        r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=list(targets),
        use_rslora=config.variant == "rslora", use_dora=config.variant == "dora",
        init_lora_weights=True if config.init == "default" else config.init, bias="none",
        fan_in_fan_out=False, modules_to_save=modules_to_save)


def apply_lora(model: nn.Module, config: LoraConfig, base: str | None = None,
               modules_to_save: list[str] | None = None, device: torch.device | str | None = None,
               seed: int | None = None, verbose: bool = True):
    """Wrap `model` in adapters (peft's PeftModel); every base weight is frozen.

    base: what the model was loaded from (preset, hub id, path): recorded for save_adapter.
    modules_to_save: modules trained in full beside the adapters and saved with them (a classifier's
    new head: ["lm_head"]). device: where training runs (QLoRA quantizes there; it needs CUDA).
    seed: seeds torch first, so that the adapters' random initialisation is part of the run's seed.
    The model keeps its interface: `wrapped(input_ids)`, `.hidden`, `.lm_head`, `.config` reach it.
    """
    check_lora(config)
    if not config.enabled:
        raise ValueError("apply_lora needs lora.r > 0")
    if is_lora_model(model):
        raise ValueError("the model already has adapters; merge them first (merge_adapter)")
    targets = resolve_targets(model, config.targets)
    check_rank(model, targets, config.r)
    if config.quantize:
        quantize_base(model, config.quantize, device if device is not None else "cuda")
    import peft

    if seed is not None:
        torch.manual_seed(seed)
    wrapped = peft.get_peft_model(model, peft_config(config, targets, modules_to_save),
                                  autocast_adapter_dtype=not config.quantize)
    if config.quantize:
        cast_floating(wrapped, torch.bfloat16)  # QLoRA: adapters (and everything not 4-bit) in bf16
    wrapped.posttrain_base = base  # read by save_adapter
    if verbose:
        print(describe(wrapped, config, targets))
    return wrapped


def is_lora_model(model: nn.Module) -> bool:
    """Whether `model` is a peft-wrapped model (without importing peft when nothing could be one)."""
    if "peft" not in sys.modules:
        return False
    from peft import PeftModel
    return isinstance(model, PeftModel)


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; shared tensors once; a 4-bit weight counts its real elements."""
    trainable = total = 0
    for p in model.parameters():  # parameters() yields a tied tensor once
        n = p.numel()
        if p.__class__.__name__ == "Params4bit":  # two 4-bit values per stored byte
            n = int(math.prod(p.quant_state.shape)) if getattr(p, "quant_state", None) is not None else n * 2
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def format_counts(model: nn.Module) -> str:
    trainable, total = parameter_counts(model)
    return f"trainable {trainable:,} of {total:,} parameters ({100 * trainable / max(total, 1):.2f}%)"


def describe(model: nn.Module, config: LoraConfig, targets: list[str]) -> str:
    quant = f", base in 4-bit {config.quantize}" if config.quantize else ""
    return (f"LoRA ({config.variant}, r {config.r}, alpha {config.alpha:g}, dropout {config.dropout:g}, init "
            f"{config.init}{quant}) on {', '.join(targets)}: {format_counts(model)}")


def new_tokens_error(style: str) -> ValueError:
    """A trainer's error when its prompt style grows the vocabulary under LoRA: the new embedding rows
    would stay untrained (frozen), so the model could never emit, say, its end-of-turn token."""
    return ValueError(f"prompt style {style} adds special tokens to the tokenizer, but LoRA keeps the token "
                      f"embeddings frozen; use a style the tokenizer already has tokens for (alpaca, or template "
                      f"with the model's own chat template), or full fine-tuning (lora.r 0)")


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What trains in a LoRA model: the adapters and any modules_to_save (peft froze the rest)."""
    if not is_lora_model(model):
        raise ValueError("the model has no adapters: apply_lora(model, LoraConfig(r=...)) first (CLI: --lora.r 8)")
    return [p for p in model.parameters() if p.requires_grad]


# classify's head.trainable "lora": the adapters plus the head (posttrain.models.heads' hook).
register_trainable_policy("lora", lambda model, last_k: trainable_parameters(model))


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """The base model inside the block (peft's disable_adapter); a model without adapters as it is."""
    if not is_lora_model(model):
        yield model
        return
    with model.disable_adapter():
        yield model


def base_model_reference(model: nn.Module, logps_fn):
    """A reference for DPO without a second copy of the weights: `batch -> logps_fn(model, batch)`
    computed with the adapters disabled (the base model), under no_grad."""
    def reference(batch: dict) -> torch.Tensor:
        with torch.no_grad(), adapters_disabled(model):
            return logps_fn(model, batch)
    return reference


def is_quantized(model: nn.Module) -> bool:
    return any(p.__class__.__name__ == "Params4bit" for p in model.parameters())


def merge_adapter(model: nn.Module, rebuild_base: Callable[[], nn.Module] | None = None) -> nn.Module:
    """The native model with the adapters folded into its weights (peft's merge_and_unload).

    rebuild_base: a function that builds the base again in full precision (e.g. loads it from disk);
    then the adapters (and modules_to_save) are copied onto it and merged there, not into `model`'s own
    base. QLoRA needs it: its base is 4-bit, and merging into that would round the update away.
    """
    if not is_lora_model(model):
        return model
    if rebuild_base is not None:
        import copy

        import peft

        config, state = copy.deepcopy(model.peft_config[ADAPTER_NAME]), adapter_state_dict(model)
        fresh = peft.get_peft_model(rebuild_base(), config)
        load_adapter_state_dict(fresh, state, "merge_adapter")
        fresh.posttrain_base = getattr(model, "posttrain_base", None)
        model = fresh
    elif is_quantized(model):
        raise ValueError("the base is 4-bit (QLoRA): merge into the full-precision base instead "
                         "(merge_adapter(model, rebuild_base=...), or save_adapter then posttrain merge RUN OUT, "
                         "which reloads the base)")
    merged = model.merge_and_unload()
    for p in merged.parameters():
        p.requires_grad_(True)
    return merged


# ----------------------------------------------------------------------------------------------
# QLoRA

def require_cuda_for_qlora(device: torch.device | str) -> None:
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"lora.quantize (QLoRA) needs a CUDA GPU: bitsandbytes' 4-bit layers train there, and "
                         f"this run is on {device.type}. Drop --lora.quantize for plain LoRA (or full fine-tuning), "
                         f"or run on a machine with a GPU")


def require_bitsandbytes():
    """bitsandbytes, or a ValueError (a setting this environment cannot run: the CLI's one-line error)
    that says how to get it."""
    try:
        import bitsandbytes
    except ImportError as e:
        raise ValueError(f"lora.quantize (QLoRA) needs bitsandbytes, which is not installed ({e}): "
                         f"pip install bitsandbytes (or posttrain[qlora]), or drop --lora.quantize for plain "
                         f"LoRA") from None
    return bitsandbytes


def quantize_base(model: nn.Module, quant_type: str = "nf4", device: torch.device | str = "cuda") -> int:
    """Replace every linear layer of the blocks by a bitsandbytes 4-bit one, quantized on `device`
    (double quantization, bf16 compute, as QLoRA); the rest of the model goes to `device` in bf16.
    Returns the number of layers quantized. Marks the model so that peft wraps them with its 4-bit LoRA.

    This is what transformers' BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
    bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16) builds, done on the native
    modules (bitsandbytes: load the weights into a Linear4bit, then .to("cuda") quantizes them).
    peft's prepare_model_for_kbit_training is not called: it freezes the base (get_peft_model does too),
    drives gradient checkpointing through transformers' API, and upcasts everything outside the 4-bit
    weights to fp32, where QLoRA here keeps the adapters, embeddings and norms in bf16."""
    require_cuda_for_qlora(device)
    bnb = require_bitsandbytes()
    names = list(linear_modules(model))
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=old.bias is not None,
                                compute_dtype=torch.bfloat16, compress_statistics=True, quant_type=quant_type,
                                device="meta")
        new.weight = bnb.nn.Params4bit(old.weight.data.to(torch.bfloat16), requires_grad=False,
                                       compress_statistics=True, quant_type=quant_type, module=new)
        if old.bias is not None:
            new.bias = nn.Parameter(old.bias.data.to(torch.bfloat16), requires_grad=False)
        setattr(parent, child, new.to(device))  # Params4bit quantizes when it reaches the GPU
        del old
    cast_floating(model, torch.bfloat16)
    model.to(device)
    model.is_loaded_in_4bit = True  # peft's flag (transformers sets it) to dispatch to its 4-bit LoRA layer
    return len(names)


def cast_floating(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast every floating parameter and buffer outside bitsandbytes' 4-bit weights to `dtype`."""
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.is_floating_point() and p.__class__.__name__ != "Params4bit":
                p.data = p.data.to(dtype)
        for name, b in list(module.named_buffers(recurse=False)):
            if b.is_floating_point() and name != "inv_freq":  # rotary frequencies stay fp32
                setattr(module, name, b.to(dtype))


# ----------------------------------------------------------------------------------------------
# Adapter state: checkpoints and the PEFT directory

def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter (and modules_to_save) tensors under peft's saved names, on the CPU, contiguous."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME, save_embedding_layers=False)
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Put adapter tensors (adapter_state_dict's names) into `model`; every one must fit and none be missing."""
    from peft import set_peft_model_state_dict

    expected = set(adapter_state_dict(model))
    missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or extra:
        raise ValueError(f"{source}: the adapter does not fit the model: missing {missing[:5]}, unexpected "
                         f"{extra[:5]}. Were the run's lora.targets, variant or head different?")
    device = next(model.parameters()).device
    result = set_peft_model_state_dict(model, {k: v.to(device) for k, v in state.items()}, adapter_name=ADAPTER_NAME)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"{source}: adapter tensors with no place in the model: {result.unexpected_keys[:5]}")


def checkpoint_tensors(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """What a training checkpoint stores of `model`: its adapter state when it has adapters, else None
    (the caller stores the whole state dict)."""
    return adapter_state_dict(model) if is_lora_model(model) else None


def hf_base(base: str | None) -> tuple[str | None, str | None]:
    """(the base as posttrain loads it, the base as transformers loads it) for what a run started from:
    a preset becomes its hub id for transformers; a local path becomes absolute (a run directory: its
    model/ folder, for transformers)."""
    if base is None:
        return None, None
    from posttrain.models.registry import PRESETS

    path = Path(base).expanduser()
    if path.exists():
        path = path.resolve()
        return str(path), str(path / "model" if (path / "model").is_dir() else path)
    if base in PRESETS:
        return base, PRESETS[base].hub_id
    return base, base


def save_adapter(model: nn.Module, tokenizer, out_dir: str | os.PathLike, base: str | None = None,
                 extra_files: dict[str, str] | None = None) -> Path:
    """Write the adapter as peft does (adapter_config.json, adapter_model.safetensors), the tokenizer,
    posttrain_adapter.json (the base) and `extra_files` (name -> text); atomically (a sibling folder
    renamed into place).

    adapter_config.json is written for transformers' model of the base: task_type CAUSAL_LM,
    base_model_name_or_path its hub id or path, fan_in_fan_out true for GPT-2 (Conv1D there).
    """
    from safetensors.torch import save_file

    from posttrain.weights.export import staged_directory

    if not is_lora_model(model):
        raise ValueError("save_adapter: the model has no adapters")
    base = base if base is not None else getattr(model, "posttrain_base", None)
    posttrain_base, transformers_base = hf_base(base)
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / ADAPTER_CONFIG).exists()
                                              and not (out / "config.json").exists())):
        raise FileExistsError(f"{out} exists and is not a model or adapter directory; refusing to replace it")
    cfg = _saved_config(model, transformers_base)
    inner = model.get_base_model()
    with staged_directory(out) as tmp:
        save_file(adapter_state_dict(model), str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        cfg.save_pretrained(str(tmp))
        meta = {"base_model": posttrain_base, "base_model_hf": transformers_base, "model_type": inner.config.model_type,
                "vocab_size": inner.config.vocab_size}
        (tmp / BASE_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return out


def _saved_config(model: nn.Module, base_hf: str | None):
    """peft's config as written for transformers' model of the base (a copy; training's is unchanged)."""
    import copy

    cfg = copy.deepcopy(model.peft_config[ADAPTER_NAME])
    cfg.base_model_name_or_path = base_hf
    cfg.inference_mode = True
    cfg.fan_in_fan_out = family(model.get_base_model()) == "gpt2"  # transformers' GPT-2 layers are Conv1D
    cfg.target_modules = sorted(cfg.target_modules) if cfg.target_modules else cfg.target_modules
    if not cfg.modules_to_save:  # a classifier's adapter (modules_to_save: its head) is no causal LM's
        cfg.task_type = "CAUSAL_LM"
    return cfg


def is_adapter_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def load_adapter(directory: str | os.PathLike, dtype: torch.dtype | str = torch.float32,
                 device: torch.device | str = "cpu", merge: bool = True, with_tokenizer: bool = False,
                 base: str | None = None):
    """The base model with the adapter in `directory` (a posttrain run's model/ or any PEFT adapter of
    a GPT-2/Llama-family model): merged into the native model (merge=True), else a PeftModel.

    The base is posttrain_adapter.json's (else adapter_config.json's base_model_name_or_path), loaded
    in fp32 on the CPU so that merging is exact, then cast to `dtype` and moved to `device`.
    Returns the model, or (model, tokenizer) with with_tokenizer (the adapter folder's tokenizer, else
    the base's).
    """
    import peft

    from posttrain.weights.hub import as_dtype, load_model

    directory = Path(directory).expanduser()
    if not is_adapter_dir(directory):
        raise FileNotFoundError(f"{directory}: no {ADAPTER_CONFIG} (not a LoRA adapter)")
    meta = json.loads((directory / BASE_FILE).read_text()) if (directory / BASE_FILE).is_file() else {}
    cfg = peft.PeftConfig.from_pretrained(str(directory))
    base = base or meta.get("base_model") or cfg.base_model_name_or_path
    if not base:
        raise ValueError(f"{directory}: the adapter does not say its base model (no {BASE_FILE}, no "
                         f"base_model_name_or_path in {ADAPTER_CONFIG})")
    if cfg.peft_type != peft.PeftType.LORA:
        raise ValueError(f"{directory}: a {cfg.peft_type} adapter; posttrain loads LoRA adapters")
    try:
        model = load_model(base, dtype=torch.float32, device="cpu")
    except (OSError, ValueError) as e:
        raise type(e)(f"{directory}: cannot load the adapter's base model {base!r}: {e}") from e
    if meta.get("vocab_size") and model.config.vocab_size != meta["vocab_size"]:
        raise ValueError(f"{directory}: the adapter was trained on a base with {meta['vocab_size']} token embeddings, "
                         f"but {base} has {model.config.vocab_size}")
    if cfg.modules_to_save:
        raise ValueError(f"{directory}: the adapter trains modules_to_save {cfg.modules_to_save} (a classifier's "
                         f"head); load the run's classifier with posttrain.predict instead")
    cfg.fan_in_fan_out = False  # native nn.Linear everywhere (transformers' GPT-2 needs true)
    cfg.inference_mode = True
    cfg.task_type = None  # the native model is wrapped as a plain PeftModel
    wrapped = peft.PeftModel.from_pretrained(model, str(directory), config=cfg)
    wrapped.posttrain_base = base
    out = merge_adapter(wrapped) if merge else wrapped
    out = out.to(device=device, dtype=as_dtype(dtype)).eval()
    if not with_tokenizer:
        return out
    from posttrain.tokenizer import Tokenizer, load_tokenizer

    has_own = (directory / "tokenizer.json").is_file() or (directory / "vocab.json").is_file()
    return out, Tokenizer.from_dir(directory) if has_own else load_tokenizer(base)


def merge_command(run: str, out_dir: str, dtype: str = "float32") -> Path:
    """Fold a LoRA run's adapter into its base model and write a plain Hugging Face directory.

    The base (the model the run started from) is loaded in full precision, the adapter applied and
    merged (peft's merge_and_unload); the result loads in transformers, vLLM, lm-eval, and in
    posttrain like any model. The run's prompt style (posttrain.json) is kept.

    Args:
        run: a LoRA run directory (runs/<name>) or its model/ folder, or any PEFT LoRA adapter folder.
        out_dir: where to write the merged model (replaced atomically if it holds a model already).
        dtype: float32, bfloat16 or float16.
    """
    from posttrain.generate import STYLE_FILE
    from posttrain.weights.export import save_pretrained
    from posttrain.weights.hub import as_dtype

    path = Path(run).expanduser()
    directory = next((d for d in (path, path / "model") if is_adapter_dir(d)), None)
    if directory is None:
        raise FileNotFoundError(f"{run}: no LoRA adapter there (expected {path / 'model' / ADAPTER_CONFIG}); a "
                                f"run trained without --lora.r holds a full model: `posttrain export` writes it")
    model, tokenizer = load_adapter(directory, torch.float32, "cpu", merge=True, with_tokenizer=True)
    style_file = directory / STYLE_FILE
    out = save_pretrained(model, tokenizer, out_dir, dtype=as_dtype(dtype),
                          extra_files={STYLE_FILE: style_file.read_text()} if style_file.is_file() else None)
    print(f"merged the adapter of {run} into its base -> {out}")
    return out
