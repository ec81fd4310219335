#!/usr/bin/env bash
# The main job on the embedded default, CPU is fine: set up ./.venv, prepare the bundled SYNTHETIC
# HelpSteer2-schema data, build the tiny Qwen3 model offline, train it through run_bt_rm.sh on
# 2 processes (gloo on CPU), then evaluate the final checkpoint and plot the training curves.
# Usage: bash demo/run_demo.sh [hydra overrides...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash setup.sh
PY=.venv/bin/python

$PY prepare_helpsteer2.py --input demo/helpsteer2_demo.jsonl.gz --output-dir data/demo
[ -f demo/tiny-qwen3/model.safetensors ] || $PY demo/make_tiny_model.py --output demo/tiny-qwen3

export N_GPUS_PER_NODE=${N_GPUS_PER_NODE:-2} MODEL_PATH=demo/tiny-qwen3 PYTHON=$PY
export TRAIN_FILE=data/demo/train.parquet VAL_FILE=data/demo/test.parquet
export TRAIN_BATCH_SIZE=32 LR=1e-3 TOTAL_EPOCHS=2 MAX_LENGTH=1024
export SAVE_PATH=checkpoints EXPERIMENT_NAME=demo MASTER_PORT=${MASTER_PORT:-29511}
rm -rf "${SAVE_PATH:?}/$EXPERIMENT_NAME"  # a fresh run each time (the trainer would otherwise resume)
bash run_bt_rm.sh trainer.test_freq=10 optim.warmup_steps_ratio=0.1 "$@"

final_step=$(cat "$SAVE_PATH/$EXPERIMENT_NAME/latest_checkpointed_iteration.txt")
$PY evaluate_rm.py --model "$SAVE_PATH/$EXPERIMENT_NAME/global_step_$final_step" --data "$VAL_FILE" \
  --output "$SAVE_PATH/$EXPERIMENT_NAME/val_scores.jsonl" --no-progress
echo "demo done: checkpoint $SAVE_PATH/$EXPERIMENT_NAME/global_step_$final_step/huggingface, curves $SAVE_PATH/$EXPERIMENT_NAME/training_curves.png"
