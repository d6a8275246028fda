#!/usr/bin/env bash
# Full-scale quality benchmark on one GPU host that has no package registry and no model hub.
#
#   bench/quality_gpu.sh OUT_DIR [extra quality.py args]
#
# What must be brought along beforehand (the device tool carries at most 64 MiB a call):
#   $NACD_WHEELS  a folder of wheels for what the host lacks (pydantic, datasets, pyarrow, lm_eval
#                 and their pure-Python dependencies; `pip download -r requirements.txt` here);
#   $NACD_CACHE   the converted model folders, ~/.cache/nacd/models/* from this machine, sent in
#                 50 MB parts and joined there (sha256-checked), so no GGUF or gguf package is needed;
#   $NACD_DATA    a folder laid out like shared/data.
# Nothing is fetched from the network. Results and logs go under OUT_DIR as they are produced, so
# a run killed at its time limit keeps what it finished; rerunning resumes (stages are atomic).
set -euo pipefail
out=${1:?usage: bench/quality_gpu.sh OUT_DIR [quality.py args]}; shift
mkdir -p "$out"
cd "$(dirname "$0")/.."
: "${NACD_CACHE:?set NACD_CACHE to the folder holding models/}"
: "${NACD_DATA:?set NACD_DATA to a folder laid out like shared/data}"
if [[ -n "${NACD_WHEELS:-}" ]]; then
  python -m pip install --no-index --find-links "$NACD_WHEELS" --quiet -r <(grep -vE '^(torch|transformers|peft|deepspeed|kfp|gemma3|gguf)' requirements.txt) 2>&1 | tee "$out/pip.log"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 NACD_CACHE
nvidia-smi --query-gpu=name,memory.total --format=csv > "$out/gpu.txt" 2>&1 || true
python bench/quality.py --scale full --data-dir "$NACD_DATA" --out "$out" --work "$out/work" "$@" \
  > "$out/quality.log" 2>&1
