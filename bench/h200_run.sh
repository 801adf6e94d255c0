#!/usr/bin/env bash
# The batched H200 session: every GPU claim of the issues, measured in few device calls.
#   bash bench/h200_run.sh STAGE...   (stages: env nvml agent final nvitop ddp checks integrations load_start
#   load_collect cost paired pairedcpu costab overhead predict public patterns cudatests zoo zooboundary fast16 hubrec load64)
# Runs from the repo root on the GPU machine; results land under $OUT (packed into $OUT/results_TAG.tar.gz too).
set -u
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT/r"
R=$OUT/r
TAG=${RUN_TAG:-$(date +%H%M%S)}  # this call's archive: $OUT/results_$TAG.tar.gz
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
# background jobs of a script ignore SIGINT, so stop them with SIGTERM
record_stop() { kill -TERM $REC 2>/dev/null; wait $REC; }

# SMOKE=1: the same stages, tiny and on the CPU, to check this script here before spending device time
if [ "${SMOKE:-0}" = 1 ]; then
  GPTX="--tiny"; DEV=cpu; N16=3; REC16=8; MONDUR=3; CHECK=""; OOMB=4; CNNX="--image-size 16 --width 4"; PREDX="--cpu-smoke"
  DDPX="--cpu --hidden 256 --input-dim 64"; INTX="--cpu"; LOADX="--agents 8 --duration 20 --warmup 5"
else
  GPTX=""; DEV=cuda; N16=16; REC16=66; MONDUR=60; CHECK="--check"; OOMB=2048; CNNX=""; PREDX=""
  DDPX=""; INTX=""; LOADX=""
fi
T="timeout 150"

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
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
  stage agent-gpt
  record_start $R/tui_h200_one_job.jsonl
  $T $BMCMD run -- python3 examples/train_gpt.py $GPTX --steps 40 --batch-size 16 $CHECK --check-out $R/check_gpt.json 2>&1 | tail -n 30 | tee $R/gpt.log
  echo "exit ${PIPESTATUS[0]}" | tee -a $R/gpt.log
  record_stop
  stage agent-cnn
  $T $BMCMD run -- python3 examples/train_cnn.py $CNNX --steps 40 --batch-size 64 $CHECK --check-out $R/check_cnn.json 2>&1 | tail -n 30 | tee $R/cnn.log
  echo "exit ${PIPESTATUS[0]}" | tee -a $R/cnn.log
  stage agent-two-jobs
  record_start $R/tui_h200_two_jobs.jsonl
  $T $BMCMD run -- python3 examples/train_gpt.py $GPTX --steps 60 --batch-size 12 > $R/two_gpt.log 2>&1 &
  J1=$!
  $T $BMCMD run -- python3 examples/train_cnn.py $CNNX --steps 300 --batch-size 96 > $R/two_cnn.log 2>&1 &
  J2=$!
  wait $J1 $J2
  record_stop
  stage agent-oom
  record_start $R/rec_oom.jsonl
  $T $BMCMD run -- python3 examples/train_gpt.py $GPTX --steps 3 --batch-size $OOMB 2>&1 | tail -n 15 | tee $R/oom.log
  echo "exit ${PIPESTATUS[0]}" | tee -a $R/oom.log
  record_stop
  stage agent-live-once
  # a monitor that connects while training runs: --once must show the agent with its components
  $T $BMCMD run -- python3 examples/train_gpt.py $GPTX --steps 400 --batch-size 8 > $R/live_train.log 2>&1 &
  TR=$!
  for i in $(seq 1 120); do ls $BATCHMON_DIR/*.sock >/dev/null 2>&1 && grep -q "step   *2 " $R/live_train.log && break; sleep 0.5; done
  $BMCMD --once > $R/once_live.txt 2>&1; $BMCMD --once --json > $R/once_live.json 2>&1
  kill -TERM $TR; wait $TR
  stage agent-16
  # 16 live agents on one GPU: recorded for the UI fixtures, and the monitor's CPU measured on them live
  PIDS=()
  for i in $(seq 1 $N16); do
    $BMCMD run -- python3 examples/train_mlp.py --device $DEV --steps 0 --sleep 1.0 --vary-batch --batch-size $((64 * i)) --hidden $((256 * (1 + i % 4))) > $R/mlp16_$i.log 2>&1 &
    PIDS+=($!)
  done
  for i in $(seq 1 120); do [ "$(ls $BATCHMON_DIR/*.sock 2>/dev/null | wc -l)" -ge $N16 ] && break; sleep 0.5; done
  $BMCMD record -o $R/tui_h200_16_agents.jsonl --interval 0.5 --duration $REC16 &
  REC=$!
  python3 bench/monitor_cpu.py --duration $MONDUR --name monitor_cpu_live16 2>&1 | tail -n 15 | tee $R/monitor_cpu_live16.log
  wait $REC
  kill -TERM "${PIDS[@]}"; wait
  stage agent-none
  $BMCMD record -o $R/tui_h200_no_agents.jsonl --interval 0.5 --duration 3
  [ "${REPLAY_CPU:-0}" = 1 ] && python3 bench/monitor_cpu.py --duration $MONDUR --replay $R/tui_h200_16_agents.jsonl --name monitor_cpu_replay16 2>&1 | tail -n 15 | tee $R/monitor_cpu_replay16.log
  ls -la $R
  ;;
final)
  # the last checks of a session: NVML against nvidia-smi with `batchmon --once` live, the CNN --check run under
  # a recorder, and the out-of-sample accuracy run of the memory model
  stage final-nvml
  python3 bench/nvml_check.py 2>&1 | tail -n 12 | tee $R/nvml_check.log
  stage final-cnn
  record_start $R/agent_h200_cnn_check.jsonl
  $T $BMCMD run -- python3 examples/train_cnn.py $CNNX --steps 40 --batch-size 64 $CHECK --check-out $R/check_cnn.json 2>&1 | tail -n 5 | tee $R/cnn.log
  record_stop
  stage final-predict
  python3 bench/predict_accuracy.py --quick $PREDX 2>&1 | tail -n 60 | tee $R/predict_accuracy.log
  python3 bench/recalibrate_margin.py $OUT/predict_accuracy.json --derive 2>&1 | tail -n 30 | tee $R/recalibrate.log
  ;;
nvitop)
  # issue 7: batchmon and nvitop side by side, same interval, 60 s, with one training process on the GPU
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
  stage nvitop
  $BMCMD run -- python3 examples/train_mlp.py --device $DEV --steps 0 --sleep 0.2 > $R/nvitop_train.log 2>&1 &
  TR=$!
  for i in $(seq 1 120); do ls $BATCHMON_DIR/*.sock >/dev/null 2>&1 && break; sleep 0.5; done
  python3 bench/vs_nvitop.py --repeat ${NVREPEAT:-3} 2>&1 | tail -n 25 | tee $R/vs_nvitop.log
  kill -TERM $TR; wait $TR
  ;;
ddp)
  # issue 6: DDP on two GPUs under torchrun, every rank attached (batchmon run, then attach() in the script),
  # recorded for the CI fixtures; then the same run unattached, for the losses
  TRUN="python3 -m torch.distributed.run --nproc-per-node 2 --master-addr 127.0.0.1"
  DDPARGS="$DDPX --steps 300 --sleep 0.05 --rank-batch-step 512 --vary-batch --report"
  for mode in run attach; do
    stage ddp-$mode
    if [ $mode = run ]; then PORT=29531; PRE="$BMCMD run --"; EXTRA=""; else PORT=29532; PRE=""; EXTRA="--attach"; fi
    record_start $R/ddp_h200_$mode.jsonl
    $T $PRE $TRUN --master-port $PORT examples/train_ddp.py $DDPARGS $EXTRA > $R/ddp_$mode.log 2>&1 &
    J=$!
    for i in $(seq 1 240); do grep -q "step   100 " $R/ddp_$mode.log && break; sleep 0.25; done
    $BMCMD --once > $R/ddp_once_$mode.txt 2>&1; $BMCMD --once --json > $R/ddp_once_$mode.json 2>&1
    wait $J; echo "exit $?" >> $R/ddp_$mode.log
    record_stop
    tail -n 4 $R/ddp_$mode.log; cat $R/ddp_once_$mode.txt
  done
  stage ddp-plain
  $T $TRUN --master-port 29533 examples/train_ddp.py $DDPARGS > $R/ddp_plain.log 2>&1; echo "exit $?" >> $R/ddp_plain.log
  python3 - $R <<'PY'
import json, re, sys
from pathlib import Path
r = Path(sys.argv[1])
def reps(name):  # tolerant: in logs from before the ranks took turns, two report lines could share a line
    text, dec, out = (r / name).read_text(), json.JSONDecoder(), {}
    for m in re.finditer(r'\{"rank": \d+', text):
        d = dec.raw_decode(text, m.start())[0]
        out[d["rank"]] = d
    return out
plain = reps("ddp_plain.log")
out = {}
for mode in ("run", "attach"):
    got = reps(f"ddp_{mode}.log")
    out[mode] = {str(k): {"attached": got[k]["agent"]["attached"], "agent_steps": got[k]["agent"].get("steps"),
                          "batch_size": got[k]["batch_size"], "losses_equal_unattached": got[k]["losses"] == plain[k]["losses"],
                          "steps": len(got[k]["losses"])} for k in sorted(got)}
print(json.dumps(out, indent=1)); (r / "ddp_losses.json").write_text(json.dumps(out, indent=1))
PY
  ;;
checks)
  # the agent's components against allocator deltas, GPT and CNN (re-run after the examples' shared step)
  stage checks
  $T $BMCMD run -- python3 examples/train_gpt.py $GPTX --steps 40 --batch-size 16 $CHECK --check-out $R/check_gpt.json 2>&1 | tail -n 12 | tee $R/gpt.log
  $T $BMCMD run -- python3 examples/train_cnn.py $CNNX --steps 40 --batch-size 64 $CHECK --check-out $R/check_cnn.json 2>&1 | tail -n 12 | tee $R/cnn.log
  ;;
integrations)
  stage integrations
  python3 bench/integrations_check.py $INTX 2>&1 | tail -n 30 | tee $R/integrations.log
  python3 bench/integrations_check.py $INTX --ddp 2 2>&1 | tail -n 30 | tee $R/integrations_ddp.log
  cp "$OUT"/integrations_check*.json $R/ 2>/dev/null
  ;;
load_start)
  # issue 7: 64 agents x 10 steps/s for 10 minutes; longer than one device call, so it runs on in its own session
  # from its own copy and load_collect (a later call) picks up its results
  rm -rf /tmp/bmload /tmp/loadout && cp -r $BM /tmp/bmload && mkdir -p /tmp/loadout
  (cd /tmp/bmload && OUT=/tmp/loadout setsid nohup python3 bench/load.py $LOADX > /tmp/loadout/load.log 2>&1 < /dev/null &)
  stage load-started
  ;;
load_collect)
  stage load-collect
  for i in $(seq 1 ${LOADWAIT:-560}); do [ -f /tmp/loadout/load.json ] && break; sleep 1; done
  cp /tmp/loadout/* $R/ 2>/dev/null; tail -n 12 /tmp/loadout/load.log
  ;;
cost)
  # issue 14 points 1 and 4: the agent's fixed cost per step (interleaved attached/plain, per-part profile)
  # on the fast models, and start-up (batchmon run around import torch, attach())
  stage cost
  CX=${COSTX:-}; SR=${STARTROUNDS:-10}; [ "${SMOKE:-0}" = 1 ] && CX="--cpu-smoke" && SR=2
  for m in ${COSTMODELS:-mlp resnet18 gpt2}; do
    python3 bench/agent_cost.py --model $m --device $DEV $CX --out $R/agent_cost_${m}_h200.json 2>&1 | tail -n 24 | tee $R/agent_cost_$m.log
  done
  python3 bench/startup.py --rounds $SR --out $R/startup_h200.json 2>&1 | tail -n 5 | tee $R/startup.log
  ;;
paired)
  # issue 14 point 1: the agent's fixed cost per step as a paired in-process A/B (bench/agent_cost_paired.py):
  # the CUDA MLP, then the host CPU's small MLP; each splits a quiet step's cost from what the samples add.
  # PAIREDX: more options (e.g. "--steps 800": blocks of ~2 s, long enough for the samples' spacing to show)
  stage paired
  if [ "${SMOKE:-0}" = 1 ]; then PX="--cpu-smoke"; else PX="${PAIREDX:-}"; fi
  python3 bench/agent_cost_paired.py --device $DEV $PX --budget ${PAIREDBUDGET:-85} --out $R/agent_cost_paired_mlp_h200.json 2>&1 | tail -n 3 | tee $R/agent_cost_paired.log
  python3 bench/agent_cost_paired.py --device cpu $PX --budget ${PAIREDCPUBUDGET:-45} --out $R/agent_cost_paired_cpu_h200.json 2>&1 | tail -n 3 | tee -a $R/agent_cost_paired.log
  ;;
pairedcpu)
  # issue 14 point 1's CPU target (<= 1.10x on a ~100 us step): the paired A/B on the host's CPU alone, a tiny MLP
  stage pairedcpu
  python3 bench/agent_cost_paired.py --device cpu ${PAIREDCPUX:---width 32 --layers 2 --batch-size 8} --budget ${PAIREDCPUBUDGET:-45} --out $R/agent_cost_paired_cpu_tiny_h200.json 2>&1 | tail -n 3 | tee $R/agent_cost_paired_cpu_tiny.log
  ;;
costab)
  # issue 14 point 1: this tree's agent against another tree's (COSTAB_OLD: a path relative to the checkout, e.g.
  # an extracted `git archive` of an earlier commit; measured with this tree's bench) on the same lease, in ABBA order (a lease's figures drift
  # downward over its first minutes: a fixed new-then-old order favours the later one), COSTAB_N pairs
  stage costab
  OLDTREE=${COSTAB_OLD:?set COSTAB_OLD to the other tree}
  [ -d "$OLDTREE/batchmon" ] || { echo "costab: $OLDTREE has no batchmon/"; exit 1; }
  [ -d "$OLDTREE/batchmon/probes" ] || cp -r "$OLDTREE/probes" "$OLDTREE/batchmon/probes"
  [ -d "$OLDTREE/batchmon/tui" ] || cp -r "$OLDTREE/tui" "$OLDTREE/batchmon/tui"
  CM=${COSTAB_MODEL:-mlp}; CX=${COSTX:-}; [ "${SMOKE:-0}" = 1 ] && CX="--cpu-smoke"
  k=0
  for i in $(seq 1 ${COSTAB_N:-2}); do
    for v in new old old new; do
      k=$((k + 1)); tree=$BM; [ $v = old ] && tree=$(cd "$OLDTREE" && pwd)
      # this tree's bench for both (the same measurement), the agent imported from the tree under test
      PYTHONPATH=$tree python3 bench/agent_cost.py --model $CM --device $DEV $CX --out $R/costab_${k}_$v.json 2>&1 | head -n 1 | sed "s/^/$k $v: /" | tee -a $R/costab.log
    done
  done
  ;;
overhead)
  stage overhead
  python3 bench/agent_overhead.py $GPTX 2>&1 | tail -n 40 | tee $R/agent_overhead.log
  ;;
public)
  # issue 12: public training scripts nobody here wrote (fetched into .ext/, carried), run unmodified, plain
  # and under `batchmon run` with a recorder beside them (bench/public_scripts.py)
  stage public
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
  (cd .ext/time_sequence_prediction && [ -f traindata.pt ] || python3 generate_sine_wave.py)
  python3 bench/public_scripts.py --root .ext --out $R/public_scripts_h200.json ${PUBLIC_ONLY:-} 2>&1 | tee $R/public_scripts.log
  ;;
spy)
  # issue 14 point 1: where the attached step's extra time goes - py-spy samples of one process per mode
  # (bench/agent_cost.py --only), raw collapsed stacks per thread, compared offline. Each round attaches afresh
  # (3 full steps, a first sample): SPYX="--steps 3000" with few SPYROUNDS shows the steady state's samples
  stage spy
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/py_spy*.whl
  for m in ${SPYMODELS:-resnet18 mlp}; do
    # SPYMODES: the processes in order, e.g. "plain attached plain attached" (an A/A and order control: the
    # attached process's whole loop ran 10-30% more samples than the plain one in 5 of 6 calls, in torch's frames)
    i=0
    for mode in ${SPYMODES:-attached plain}; do
      i=$((i + 1)); sfx=$mode; [ -n "${SPYMODES:-}" ] && sfx=${mode}_$i
      /tmp/site/bin/py-spy record --rate ${SPYRATE:-400} --nonblocking --threads --format raw -o $R/spy_${m}_$sfx.txt -- \
        python3 bench/agent_cost.py --model $m --device $DEV --only $mode --rounds ${SPYROUNDS:-12} ${SPYX:-} --out $R/spy_${m}_$sfx.json 2>&1 | tail -n 3
    done
  done
  ;;
ab)
  # issue 14: public scripts' own step times, plain vs `batchmon run`, alternating (bench/step_time_ab.py)
  stage ab
  python3 bench/step_time_ab.py --name nanogpt-compile --cwd .ext/nanoGPT --pattern 'time ([0-9.]+)ms' --skip 1 \
    --runs ${ABRUNS:-3} --out $R/ab_nanogpt_compile.json -- python3 train.py config/train_shakespeare_char.py \
    --max_iters=150 --eval_interval=1000 --eval_iters=2 --log_interval=10 2>&1 | tail -n 8
  python3 bench/step_time_ab.py --name nanogpt-eager --cwd .ext/nanoGPT --pattern 'time ([0-9.]+)ms' --skip 1 \
    --runs ${ABRUNS:-3} --out $R/ab_nanogpt_eager.json -- python3 train.py config/train_shakespeare_char.py \
    --max_iters=150 --eval_interval=1000 --eval_iters=2 --log_interval=10 --compile=False 2>&1 | tail -n 8
  ;;
phaserec)
  # issue 16 point 4: a real recording with the peak's phase (GPT and CNN examples side by side)
  stage phaserec
  record_start $R/tui_h200_peak_phase.jsonl
  $T $BMCMD run -- python3 examples/train_gpt.py $GPTX --steps 80 --batch-size 16 > $R/phase_gpt.log 2>&1 & G=$!
  $T $BMCMD run -- python3 examples/train_cnn.py $CNNX --steps 120 --batch-size 64 2>&1 | tail -n 3
  wait $G; tail -n 3 $R/phase_gpt.log; sleep 1
  record_stop
  ;;
patterns)
  # issue 12: the pattern corpus (tests/patterns/) on CUDA, plain and under `batchmon run`
  stage patterns
  python3 bench/patterns_run.py --device $DEV ${PATTERNSX:-} --out $R/patterns_h200.json 2>&1 | tail -n 40 | tee $R/patterns.log
  ;;
cudatests)
  # the agent tests that have CUDA cases (a script's own memory calls, no trace, compile), on the GPU
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
  stage cudatests
  python3 -m pytest -q -p no:cacheprovider -rfEs tests/test_agent_memory_calls.py tests/test_agent_no_trace.py tests/test_agent_compile_quiet.py tests/test_agent_peak_phase.py ${CUDATESTSX:-} > $R/cudatests.log 2>&1; grep -E '^(FAILED|ERROR)|passed|failed' $R/cudatests.log | tail -n 30
  ;;
fsdp)
  # issue 13 point 3: FSDP2 (fully_shard) on 2 GPUs, every rank attached: per-rank peaks and largest batch
  # predicted vs measured, and the sharding what-if from an unsharded one-GPU run (needs nvidia-h200-x2)
  stage fsdp
  if [ "${SMOKE:-0}" = 1 ]; then FSDPX="--cpu-smoke"; else FSDPX="--budget-s ${FSDP_BUDGET:-200}"; fi
  timeout 420 python3 bench/fsdp_predict.py $FSDPX --out $R/fsdp_predict_h200_x2.json 2>&1 | tail -n 30 | tee $R/fsdp_predict.log
  ;;
zoo)
  # issue 13: predicted vs measured peaks and largest batches on architectures nobody here tuned on
  stage zoo
  python3 bench/predict_zoo.py ${ZOOX:-} --out $R/predict_zoo_h200.json 2>&1 | tail -n 60 | tee $R/predict_zoo.log
  ;;
zooboundary)
  # issue 13: is a what-if's real largest batch path dependent? single trials on fresh runners (a job that starts
  # at that batch) at the what-ifs' predicted and real boundaries, and the largest batch T5 checkpointing starts at
  stage zooboundary
  python3 bench/zoo_boundary.py ${ZOOBX:---plan t5-small:checkpointing:bisect=303-321 gpt2-fp32:checkpointing:70/71 t5-small:amp:76/79 gpt2-fp32:amp:32/33 t5-small:none:70/71} --out $R/zoo_boundary_h200.json 2>&1 | tail -n 12 | tee $R/zoo_boundary.log
  ;;
predict)
  stage predict
  python3 bench/predict_accuracy.py $PREDX 2>&1 | tail -n 80 | tee $R/predict_accuracy.log
  ;;
longrun)
  # issue 16 point 4: a long CIFAR-sized ResNet-18 run with a common slow leak (logits kept per epoch), recorded
  stage longrun
  record_start $R/tui_h200_long_run.jsonl
  $T $BMCMD run -- python3 bench/long_run.py --steps ${LONGSTEPS:-1600} --epoch 400 --sleep ${LONGSLEEP:-0.01} 2>&1 | tail -n 8 | tee $R/long_run.log
  record_stop
  ;;
fast16)
  # issue 14 point 3: 16 fast agents (MLP steps, >= 100 steps/s each) and the monitor beside nvitop
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
  stage fast16
  PIDS=()
  for i in $(seq 1 16); do
    $BMCMD run -- python3 examples/train_mlp.py --device $DEV --steps 0 --sleep ${FASTSLEEP:-0.004} --batch-size 256 --hidden 512 --layers 8 > $R/fast16_$i.log 2>&1 &
    PIDS+=($!)
  done
  for i in $(seq 1 120); do [ "$(ls $BATCHMON_DIR/*.sock 2>/dev/null | wc -l)" -ge 16 ] && break; sleep 0.5; done
  sleep 5
  $BMCMD --once --json > $R/fast16_once_a.json 2>&1
  # the hub thread's parts (reads, decode, ingest, NVML, host, snapshot) and where the RSS is, on the real jobs
  [ "${FASTPARTS:-1}" = 1 ] && python3 bench/monitor_hub_parts.py --agents 0 --warmup 10 --duration 30 \
    --out $R/monitor_hub_parts_fast16_h200.json 2>&1 | tail -n 25 | tee $R/monitor_hub_parts_fast16.log
  if [ "${FASTPROF:-0}" = 1 ]; then
    # where the monitor's CPU goes beside 16 fast agents: per thread, then under cProfile
    python3 bench/monitor_cpu.py --duration 30 --name monitor_cpu_fast16 2>&1 | tail -n 4 | tee $R/monitor_cpu_fast16.log
    python3 bench/monitor_cpu.py --duration 30 --name monitor_cpu_fast16_prof --profile $R/monitor_fast16.prof 2>&1 | tail -n 4
    cp $OUT/monitor_cpu_fast16*.json $R/ 2>/dev/null
  fi
  [ "${FASTPROF:-0}" = 1 ] && [ "${FASTNV:-1}" = 0 ] || python3 bench/vs_nvitop.py --repeat ${NVREPEAT16:-1} --no-floors --name vs_nvitop_fast16 --duration ${FASTDUR:-60} ${FASTDUMP:+--dump} 2>&1 | tail -n 12 | tee $R/vs_nvitop_fast16.log
  $BMCMD --once --json > $R/fast16_once_b.json 2>&1
  kill -TERM "${PIDS[@]}"; wait
  cp $OUT/vs_nvitop_fast16.json $R/ 2>/dev/null
  cp $OUT/vs_nvitop_fast16_*_window.bin $R/ 2>/dev/null
  python3 - $R <<'PY'
import json, sys
from pathlib import Path
r = Path(sys.argv[1])
a, b = (json.loads((r / f).read_text()) for f in ("fast16_once_a.json", "fast16_once_b.json"))
before = {x["pid"]: x for x in a["agents"]}
rates = sorted(round((x["step"] - before[x["pid"]]["step"]) / (x["time"] - before[x["pid"]]["time"]), 1)
               for x in b["agents"] if x["pid"] in before and x["step"] and before[x["pid"]]["step"] and x["time"] > before[x["pid"]]["time"])
out = {"agents_a": len(a["agents"]), "agents_b": len(b["agents"]), "steps_per_s": rates}
print(json.dumps(out)); (r / "fast16_rates.json").write_text(json.dumps(out, indent=1))
PY
  ;;
hubrec)
  # issue 14 point 3: the 16 fast jobs' real messages recorded for 60 s, then replayed through the hub's state
  # (bench/hub_apply_cost.py): how many refits, and the hub's cost per record kind, on what real agents send
  stage hubrec
  PIDS=()
  for i in $(seq 1 16); do
    $BMCMD run -- python3 examples/train_mlp.py --device $DEV --steps 0 --sleep ${FASTSLEEP:-0.004} --batch-size 256 --hidden 512 --layers 8 > $R/hubrec_$i.log 2>&1 &
    PIDS+=($!)
  done
  for i in $(seq 1 120); do [ "$(ls $BATCHMON_DIR/*.sock 2>/dev/null | wc -l)" -ge 16 ] && break; sleep 0.5; done
  sleep ${HUBRECWARM:-15}
  $BMCMD record -o $R/fast16_rec.jsonl --duration ${HUBRECDUR:-60} --interval 1
  kill -TERM "${PIDS[@]}"; wait
  python3 bench/hub_apply_cost.py --recording $R/fast16_rec.jsonl --warmup 10 --out $R/hub_apply_fast16_h200.json 2>&1 | tail -n 25 | tee $R/hub_apply_fast16.log
  ;;
load64)
  # issue 14 point 3: 64 agents at 1000 steps/s each, coalescing as the real agent does, one hub
  stage load64
  python3 bench/load.py --agents 64 --rate 1000 --duration ${LOAD64DUR:-60} --warmup 20 --coalesce --p99 0.25 --interval ${LOAD64INT:-0.25} 2>&1 | tail -n 12 | tee $R/load64.log
  cp $OUT/load.json $R/load64_h200.json 2>/dev/null
  ;;
esac
# packed after every stage too: a call that runs past its limit still brings back the stages it finished
tar -czf /tmp/results_partial.tar.gz -C "$OUT" r 2>/dev/null && mv /tmp/results_partial.tar.gz "$OUT/results_$TAG.tar.gz"
done

# only 8 files come back: pack everything into one archive per call of this script (results_TAG.tar.gz), leaving
# the archives of earlier calls in the same device command as they are (one command may run this script twice)
ls -la "$OUT" "$R"
rm -f "$OUT/results_$TAG.tar.gz"
tar -czf /tmp/results.tar.gz --exclude='./results_*.tar.gz' -C "$OUT" . \
  && find "$OUT" -mindepth 1 -maxdepth 1 ! -name 'results_*.tar.gz' -exec rm -rf {} + \
  && mv /tmp/results.tar.gz "$OUT/results_$TAG.tar.gz"
ls -la "$OUT"
