#!/usr/bin/env bash
# The batched H200 session: every GPU claim of the issues, measured in few device calls.
#   bash bench/h200_run.sh STAGE...   (stages: env nvml agent overhead predict tui)
# Runs from the repo root on the GPU machine; results land under $OUT (packed into $OUT/results.tar.gz too).
set -u
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT/r"
R=$OUT/r
export PYTHONUNBUFFERED=1

# batchmon importable without an install step (no network there): a copy of the checkout whose batchmon/
# folder is laid out as the package installs (probes/ and tui/ inside), so `python -m batchmon` from its root
# finds the whole package; everything below runs from there.
BM=/tmp/bm
rm -rf $BM && mkdir -p $BM && cp -r . $BM/ && cp -r probes $BM/batchmon/probes && cp -r tui $BM/batchmon/tui
cd $BM || exit 1
export PYTHONPATH=$BM${PYTHONPATH:+:$PYTHONPATH}
export BATCHMON_DIR=/tmp/batchmon-h200
rm -rf $BATCHMON_DIR
BMCMD="python3 -m batchmon"

stage() { echo; echo "=== $1  ($(date +%T))"; }

record_start() { $BMCMD record -o "$1" --interval 0.25 & REC=$!; }
record_stop() { kill -INT $REC 2>/dev/null; wait $REC; }

for s in "$@"; do
case $s in
env)
  stage env
  { nvidia-smi; python3 -c 'import torch, pynvml, sys; print(sys.version); print("torch", torch.__version__, torch.cuda.is_available()); pynvml.nvmlInit(); print("driver", pynvml.nvmlSystemGetDriverVersion())'; nproc; } 2>&1 | tee $R/env.txt
  ;;
nvml)
  stage nvml
  python3 bench/nvml_check.py 2>&1 | tee $R/nvml_check.log
  python3 bench/nvml_probe.py 2>&1 | tee $R/nvml_probe.log
  python3 bench/nvml_probe.py --child-gib 1 2>&1 | tee $R/nvml_probe_procs.log
  ;;
agent)
  stage agent-gpt
  record_start $R/rec_gpt.jsonl
  $BMCMD run -- python3 examples/train_gpt.py --steps 40 --batch-size 16 --check --check-out $R/check_gpt.json 2>&1 | tail -n 30 | tee $R/gpt.log
  echo "exit ${PIPESTATUS[0]}" | tee -a $R/gpt.log
  $BMCMD --once --json > $R/once_after_gpt.json 2>&1
  record_stop
  stage agent-cnn
  record_start $R/rec_cnn.jsonl
  $BMCMD run -- python3 examples/train_cnn.py --steps 40 --batch-size 64 --check --check-out $R/check_cnn.json 2>&1 | tail -n 30 | tee $R/cnn.log
  echo "exit ${PIPESTATUS[0]}" | tee -a $R/cnn.log
  record_stop
  stage agent-oom
  record_start $R/rec_oom.jsonl
  $BMCMD run -- python3 examples/train_gpt.py --steps 3 --batch-size 2048 2>&1 | tail -n 15 | tee $R/oom.log
  echo "exit ${PIPESTATUS[0]}" | tee -a $R/oom.log
  record_stop
  stage agent-live-once
  # a monitor that connects while training runs: --once must show the agent with its components
  $BMCMD run -- python3 examples/train_gpt.py --steps 400 --batch-size 8 > $R/live_train.log 2>&1 &
  TR=$!
  for i in $(seq 1 120); do ls $BATCHMON_DIR/*.sock >/dev/null 2>&1 && grep -q "step   *2 " $R/live_train.log && break; sleep 0.5; done
  $BMCMD --once > $R/once_live.txt 2>&1; $BMCMD --once --json > $R/once_live.json 2>&1
  kill -INT $TR; wait $TR
  ;;
overhead)
  stage overhead
  python3 bench/agent_overhead.py 2>&1 | tail -n 40 | tee $R/agent_overhead.log
  ;;
predict)
  stage predict
  python3 bench/predict_accuracy.py 2>&1 | tail -n 80 | tee $R/predict_accuracy.log
  ;;
tui)
  stage tui
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
  for f in $R/rec_*.jsonl tests/fixtures/rec_*.jsonl; do [ -f "$f" ] && echo "$f"; done | head -n 1
  python3 bench/monitor_cpu.py --seconds 60 2>&1 | tail -n 20 | tee $R/monitor_cpu_live.log
  ;;
esac
done

# only 8 files come back: pack everything into one archive
ls -la "$OUT" "$R"
tar -czf /tmp/results.tar.gz -C "$OUT" . && rm -rf "${OUT:?}"/* && mv /tmp/results.tar.gz "$OUT/"
ls -la "$OUT"
