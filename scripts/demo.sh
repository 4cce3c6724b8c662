#!/usr/bin/env bash
# The main job on its offline default: sets up .venv if needed, then fine-tunes the packaged
# SmolLM2-135M-Instruct on posttrain's embedded instruction set and reports exact match before/after.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
posttrain sft "$@"
