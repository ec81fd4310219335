#!/usr/bin/env bash
# Train a Bradley-Terry reward model: btrm.launcher checks, then torchrun -> bt_trainer.py with trainer.yaml.
#
#   bash run_bt_rm.sh [hydra overrides...]
#   bash run_bt_rm.sh --plan [--gpus N] [--gpu-memory GIB] [hydra overrides...]   # will it fit? (btrm.plan)
#
# Knobs are environment variables (listed below with their defaults); any extra argument is passed
# through as a Hydra override, last, so it wins:  bash run_bt_rm.sh trainer.logger=[console,file] optim.lr=1e-6
# Multi-node: run the same command on every node with WORLD_SIZE (nodes), RANK (node rank),
# MASTER_ADDR and MASTER_PORT set, as most cluster launchers do.
# Before any rank starts, the knobs' values (btrm.knobs: --help lists what each accepts), the config
# (against trainer.yaml), the data files, the model and the checkpoint to resume are checked; a problem
# stops the launch with one line (exit status 2), also appended to <save path>/<experiment>/errors.log.
# BT_DEBUG=1 adds tracebacks.
set -euo pipefail

# Each knob: NAME=${NAME:-default}  # what it sets (--help prints these lines as a table)
N_GPUS_PER_NODE=${N_GPUS_PER_NODE:-auto}           # processes per node; auto: one per visible GPU, or 2 CPU processes (gloo) when none is visible
NNODES=${NNODES:-${WORLD_SIZE:-1}}                 # nodes (cluster launchers export WORLD_SIZE)
NODE_RANK=${NODE_RANK:-${RANK:-0}}                 # this node's rank (cluster launchers export RANK)
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}              # address of node 0
MASTER_PORT=${MASTER_PORT:-29500}                  # free port on node 0
MODEL_PATH=${MODEL_PATH:-Qwen/Qwen3-32B}           # causal LM to start from: local directory (with config.json) or hub id
TRAIN_FILE=${TRAIN_FILE:-data/helpsteer2/train.parquet}  # training pairs (files, not directories; relative to the repo root)
VAL_FILE=${VAL_FILE:-data/helpsteer2/test.parquet}  # validation pairs
TRAIN_BATCH_SIZE=${TRAIN_BATCH_SIZE:-256}          # pairs per optimizer step, over all ranks
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-}             # caps the pairs of a micro-batch (data.micro_batch_size_per_gpu); unset: trainer.yaml's (null: the token budget alone)
MAX_LENGTH=${MAX_LENGTH:-4096}                     # max tokens of one conversation
LR=${LR:-5e-7}                                     # peak learning rate
TOTAL_EPOCHS=${TOTAL_EPOCHS:-3}                    # epochs
SAVE_PATH=${SAVE_PATH:-checkpoints}                # checkpoints go to SAVE_PATH/EXPERIMENT_NAME/
PROJECT_NAME=${PROJECT_NAME:-bt-rm}                # tracker project name
EXPERIMENT_NAME=${EXPERIMENT_NAME:-qwen3-32b-helpsteer2}  # run name and checkpoint sub-directory
PYTHON=${PYTHON:-auto}                             # interpreter; auto: the project's .venv/bin/python when it exists, else python3
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}              # CPU threads per process (torchrun's own default when it starts several)
MAX_RESTARTS=${MAX_RESTARTS:-0}                    # torchrun restarts the ranks this many times after one dies; they resume from the latest complete checkpoint (> 0 on several nodes: torchrun's c10d rendezvous)
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-900}          # seconds torchrun lets the ranks finish the step and save after forwarding a stop signal, before it kills them

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,/^set -euo pipefail/{/^#/s/^# \{0,1\}//p}' "$0"
  echo
  echo "knobs (environment variables), their defaults and the values each accepts (checked before torchrun starts):"
  help_python=$PYTHON
  [[ "$help_python" == auto && -x "$(dirname "$0")/.venv/bin/python" ]] && help_python="$(dirname "$0")/.venv/bin/python"
  [[ "$help_python" == auto ]] && help_python=python3
  # btrm.knobs reads these lines and adds each knob's allowed values; without a working Python, the plain table
  if ! (cd "$(dirname "$0")" && "$help_python" -m btrm.knobs --table 2>/dev/null); then
    sed -nE 's/^([A-Z_]+)=\$\{[A-Z_]+:-(.*)\}[[:space:]]+# (.*)$/\1|\2|\3/p' "$0" |
      while IFS='|' read -r knob default meaning; do
        default=$(sed -E 's/\$\{([A-Z_]+):-([^}]*)\}/$\1, else \2/' <<<"$default")
        default=${default:-(unset)}
        printf '  %-17s %-31s %s\n' "$knob" "$default" "$meaning"
      done
  fi
  exit 0
fi
KNOB_NAMES=($(sed -nE 's/^([A-Z_]+)=\$\{[A-Z_]+:-.*\}[[:space:]]+# .*$/\1/p' "$0"))

export OMP_NUM_THREADS
cd "$(dirname "$0")"
if [[ "$PYTHON" == auto ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "error: PYTHON=$PYTHON: no such interpreter; expected auto, or a Python interpreter with requirements.txt installed (bash setup.sh creates .venv)" >&2
  exit 2
fi

# GPUs this node's processes can use: CUDA_VISIBLE_DEVICES if set, else nvidia-smi's list, else
# torch's count when GPU device files exist without nvidia-smi; no device files means no GPU.
count_visible_gpus() {
  if [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
    if [[ -z "$CUDA_VISIBLE_DEVICES" || "$CUDA_VISIBLE_DEVICES" == -1 || "$CUDA_VISIBLE_DEVICES" == NoDevFiles ]]; then echo 0
    else tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c .; fi
  elif command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
  elif compgen -G '/dev/nvidia[0-9]*' >/dev/null || [[ -e /dev/kfd ]]; then
    "$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0
  else
    echo 0
  fi
}
KNOB_OVERRIDES=(
  model.partial_pretrain="$MODEL_PATH"
  data.train_files="$TRAIN_FILE"
  data.val_files="$VAL_FILE"
  data.train_batch_size="$TRAIN_BATCH_SIZE"
  data.max_length="$MAX_LENGTH"
  optim.lr="$LR"
  trainer.total_epochs="$TOTAL_EPOCHS"
  trainer.save_path="$SAVE_PATH"
  trainer.project_name="$PROJECT_NAME"
  trainer.experiment_name="$EXPERIMENT_NAME"
  ${MICRO_BATCH_SIZE:+data.micro_batch_size_per_gpu="$MICRO_BATCH_SIZE"}
)

# Every knob's value, checked before the shell does arithmetic with it or torchrun reads it (btrm.knobs):
# one line, exit status 2, also in errors.log.
KNOB_VALUES=()
for knob in "${KNOB_NAMES[@]}"; do KNOB_VALUES+=("$knob=${!knob}"); done
"$PYTHON" -m btrm.knobs --check "${KNOB_VALUES[@]}" -- "${KNOB_OVERRIDES[@]}" "$@" || exit $?

# --plan: the memory plan of this configuration (btrm.plan, fake tensors, no weights, no GPU needed) for
# NNODES x N_GPUS_PER_NODE GPUs (N_GPUS_PER_NODE=auto without a visible GPU: btrm.plan's default, 8).
if [[ "${1:-}" == "--plan" ]]; then
  shift
  GPUS_PER_NODE=$N_GPUS_PER_NODE
  [[ "$GPUS_PER_NODE" == auto ]] && GPUS_PER_NODE=$(count_visible_gpus)
  GPUS=()
  (( GPUS_PER_NODE > 0 )) && GPUS=(--gpus=$((NNODES * GPUS_PER_NODE)))
  exec "$PYTHON" -m btrm.plan_cli "${GPUS[@]}" "${KNOB_OVERRIDES[@]}" "$@"
fi

if [[ "$N_GPUS_PER_NODE" == auto ]]; then
  N_GPUS_PER_NODE=$(count_visible_gpus)
  if (( N_GPUS_PER_NODE == 0 )); then
    N_GPUS_PER_NODE=2
    echo "run_bt_rm.sh: no GPU visible: training on 2 CPU processes (gloo); set N_GPUS_PER_NODE to change" >&2
  fi
fi

# Restarted ranks must meet again. On one node torchrun's static rendezvous does; on several, every node's
# group restarts together only through its c10d rendezvous (the static one hangs there), hosted at
# MASTER_ADDR:MASTER_PORT (on one node c10d's restarted gloo ranks fail to connect: torch 2.13).
RENDEZVOUS=(--node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT")
if (( MAX_RESTARTS > 0 && NNODES > 1 )); then
  RENDEZVOUS=(--rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$EXPERIMENT_NAME")
fi

# btrm.launcher checks everything it can, then runs torchrun with these arguments in its own process.
exec "$PYTHON" -m btrm.launcher \
  --nnodes="$NNODES" --nproc_per_node="$N_GPUS_PER_NODE" "${RENDEZVOUS[@]}" \
  --max-restarts="$MAX_RESTARTS" --shutdown-timeout="$SHUTDOWN_TIMEOUT" \
  bt_trainer.py "${KNOB_OVERRIDES[@]}" "$@"
