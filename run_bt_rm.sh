#!/usr/bin/env bash
# Train a Bradley-Terry reward model: torchrun -> bt_trainer.py with trainer.yaml.
#
#   bash run_bt_rm.sh [hydra overrides...]
#
# Knobs are environment variables (defaults below); any extra argument is passed through as a
# Hydra override, last, so it wins:  bash run_bt_rm.sh trainer.logger=[console,file] optim.lr=1e-6
# Multi-node: run the same command on every node with WORLD_SIZE (nodes), RANK (node rank),
# MASTER_ADDR and MASTER_PORT set, as most cluster launchers do.
# Without GPUs, N_GPUS_PER_NODE processes train on CPU (gloo).
set -euo pipefail

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
  echo "environment knobs: N_GPUS_PER_NODE NNODES NODE_RANK MASTER_ADDR MASTER_PORT MODEL_PATH TRAIN_FILE VAL_FILE"
  echo "  TRAIN_BATCH_SIZE MICRO_BATCH_SIZE MAX_LENGTH LR TOTAL_EPOCHS SAVE_PATH PROJECT_NAME EXPERIMENT_NAME PYTHON"
  exit 0
fi

N_GPUS_PER_NODE=${N_GPUS_PER_NODE:-8}
NNODES=${NNODES:-${WORLD_SIZE:-1}}
NODE_RANK=${NODE_RANK:-${RANK:-0}}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
MODEL_PATH=${MODEL_PATH:-Qwen/Qwen3-32B}
TRAIN_FILE=${TRAIN_FILE:-data/helpsteer2/train.parquet}
VAL_FILE=${VAL_FILE:-data/helpsteer2/test.parquet}
TRAIN_BATCH_SIZE=${TRAIN_BATCH_SIZE:-256}
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-1}
MAX_LENGTH=${MAX_LENGTH:-4096}
LR=${LR:-5e-7}
TOTAL_EPOCHS=${TOTAL_EPOCHS:-3}
SAVE_PATH=${SAVE_PATH:-checkpoints}
PROJECT_NAME=${PROJECT_NAME:-bt-rm}
EXPERIMENT_NAME=${EXPERIMENT_NAME:-qwen3-32b-helpsteer2}
PYTHON=${PYTHON:-python3}

cd "$(dirname "$0")"
exec "$PYTHON" -m torch.distributed.run \
  --nnodes="$NNODES" --nproc_per_node="$N_GPUS_PER_NODE" --node_rank="$NODE_RANK" \
  --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
  bt_trainer.py \
  model.partial_pretrain="$MODEL_PATH" \
  data.train_files="$TRAIN_FILE" \
  data.val_files="$VAL_FILE" \
  data.train_batch_size="$TRAIN_BATCH_SIZE" \
  data.micro_batch_size_per_gpu="$MICRO_BATCH_SIZE" \
  data.max_length="$MAX_LENGTH" \
  optim.lr="$LR" \
  trainer.total_epochs="$TOTAL_EPOCHS" \
  trainer.save_path="$SAVE_PATH" \
  trainer.project_name="$PROJECT_NAME" \
  trainer.experiment_name="$EXPERIMENT_NAME" \
  "$@"
