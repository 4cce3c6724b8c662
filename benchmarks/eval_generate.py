"""Eval-generation throughput: the `posttrain eval generate` path against transformers' `generate` on
the same prompts, the same weights and the same greedy decoding.

posttrain: prompts sorted by length, batches of BATCH, rows that finish (EOS / end-of-turn) leave
the batch and the KV cache (posttrain.eval.responses.generate_sorted). transformers: the same
sorted batches, left-padded, `generate(do_sample=False)` with the same stop ids; a finished row
keeps its slot (padded) until the whole batch is done. Each prints one JSON line: responses/s,
generated tokens/s (up to and including the stop token), and how many responses equal the other
library's token for token.

Prompts: the instruction data's test split (DATA, default ../shared/data/instruction-data.json,
else posttrain's demo set) in the model's chat template, N of them (cycled when the split is
smaller). MODEL: anything posttrain loads (preset alias, run, HF directory, .gguf) with its
tokenizer; or `random:<preset>` for random weights of a preset's shape with random prompt ids
(lengths 16-64) where no weights or tokenizer can be had (e.g. an offline GPU machine): rows then
never stop early, as in benchmarks/generation.py.

    python benchmarks/eval_generate.py                                   # CPU smoke: N=8 NEW=16 BATCH=4
    DEVICE=cuda MODEL=smollm2-135m-instruct N=512 BATCH=64 NEW=256 python benchmarks/eval_generate.py
    DEVICE=cuda MODEL=random:gpt2 N=512 BATCH=64 NEW=256 python benchmarks/eval_generate.py
"""

from __future__ import annotations

import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generation import NoEosTokenizer, models_for  # noqa: E402  (the lead's raw-generation benchmark)

from posttrain.eval.responses import generate_sorted  # noqa: E402
from posttrain.generate import GenerationConfig  # noqa: E402
from posttrain.models.gpt2 import CONV1D_SUFFIXES  # noqa: E402

DEVICE = os.environ.get("DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
MODEL = os.environ.get("MODEL", "smollm2-135m-instruct")
N, BATCH, NEW = int(os.environ.get("N", 8)), int(os.environ.get("BATCH", 4)), int(os.environ.get("NEW", 16))
REPEATS = int(os.environ.get("REPEATS", 1))
DATA = os.environ.get("DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data" / "instruction-data.json"))
IMPLS = os.environ.get("IMPLS", "posttrain,transformers").split(",")


def hf_twin(native: torch.nn.Module) -> torch.nn.Module:
    """A transformers model holding the same weights as a native posttrain model."""
    config = transformers.AutoConfig.for_model(**native.config.to_hf())
    hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    state = {k: v.t() if k.endswith(CONV1D_SUFFIXES) else v for k, v in native.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k or k == "lm_head.weight" for k in missing), (missing, unexpected)
    if getattr(config, "tie_word_embeddings", False):
        hf.tie_weights()
    return hf


def setup():
    """(native model, HF model, prompt id lists, stop ids, tokenizer for posttrain)."""
    if MODEL.startswith("random:"):
        native, hf = models_for(MODEL.split(":", 1)[1])
        rng = random.Random(0)
        vocab = native.config.vocab_size
        prompts = [[rng.randrange(1, vocab) for _ in range(rng.randint(16, 64))] for _ in range(N)]
        return native, hf, prompts, [], NoEosTokenizer()
    from posttrain.eval.responses import load_examples
    from posttrain.prompts import get_style
    from posttrain.weights import load

    native, tokenizer = load(MODEL, dtype=DTYPE, device=DEVICE)
    native.eval()
    hf = hf_twin(native.float().cpu()).to(DEVICE, DTYPE).eval()
    native.to(DEVICE, DTYPE)
    style = get_style("auto", tokenizer)
    data = DATA if Path(DATA).is_file() else "demo"
    examples = load_examples(data, "test" if data != "demo" else "all")
    examples = [examples[i % len(examples)] for i in range(N)]
    prompts = [style.render(e.messages, add_generation_prompt=True)[0] for e in examples]
    stops = sorted({tokenizer.eos_id, *style.stop_ids, *getattr(tokenizer, "stop_ids", [])})
    return native, hf, prompts, stops, tokenizer


def run_posttrain(native, prompts, stops, tokenizer) -> list[list[int]]:
    config = GenerationConfig(max_new_tokens=NEW, stop_ids=stops)
    out = generate_sorted(native, tokenizer, prompts, config, BATCH)
    # the stop token is not in g.ids but was generated: count it as transformers' output does
    return [g.ids + ([stops[0]] if g.finish_reason == "stop" and stops else []) for g in out]


@torch.inference_mode()
def run_transformers(hf, prompts, stops, tokenizer) -> list[list[int]]:
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    outputs: dict[int, list[int]] = {}
    pad = getattr(tokenizer, "pad_id", 0) or 0
    for start in range(0, len(order), BATCH):
        batch = order[start:start + BATCH]
        width = max(len(prompts[i]) for i in batch)
        ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in batch], device=DEVICE)
        mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in batch], device=DEVICE)
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                          pad_token_id=pad, eos_token_id=stops or None)
        for row, i in enumerate(batch):
            new = out[row, width:].tolist()
            cut = next((k + 1 for k, t in enumerate(new) if t in stops), len(new))  # up to the stop token
            outputs[i] = new[:cut]
    return [outputs[i] for i in range(len(prompts))]


def timed(fn, *args):
    fn(*args)  # warm-up (kernels, allocator)
    best, result = float("inf"), None
    for _ in range(REPEATS):
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn(*args)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, result


if __name__ == "__main__":
    native, hf, prompts, stops, tokenizer = setup()
    outputs = {}
    for impl in IMPLS:
        model, fn = (native, run_posttrain) if impl == "posttrain" else (hf, run_transformers)
        seconds, outputs[impl] = timed(fn, model, prompts, stops, tokenizer)
        tokens = sum(len(o) for o in outputs[impl])
        print(json.dumps({
            "model": MODEL, "impl": impl, "device": DEVICE, "dtype": str(DTYPE), "prompts": len(prompts),
            "batch": BATCH, "max_new_tokens": NEW, "seconds": round(seconds, 3),
            "responses_per_s": round(len(prompts) / seconds, 2), "tokens_per_s": round(tokens / seconds, 1),
            "generated_tokens": tokens, "mean_prompt_tokens": round(sum(map(len, prompts)) / len(prompts), 1),
            "stopped_early": sum(1 for o in outputs[impl] if len(o) < NEW),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "machine": torch.cuda.get_device_name() if DEVICE == "cuda" else platform.machine(),
            "threads": torch.get_num_threads()}), flush=True)
    if len(outputs) == 2:
        a, b = outputs.values()
        print(json.dumps({"identical_responses": sum(x == y for x, y in zip(a, b)), "of": len(prompts)}), flush=True)
