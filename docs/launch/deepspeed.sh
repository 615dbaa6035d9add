#!/usr/bin/env bash
# PAD pre-training with the DeepSpeed launcher over the nodes of a hostfile (passwordless ssh
# between nodes; see hostfile.example). On one machine without a hostfile use --num_gpus N.
set -euo pipefail
: "${HOSTFILE:=docs/launch/hostfile.example}" "${RUN_DIR:=runs/pad_vitb}" "${SHARDS:=shards/msip}"
: "${INIT:=weights/mae_pretrain_vit_base.pth}"
# the DeepSpeed launcher with the same arguments (README: Preemption)
exec python -m pretrain.engine.launchers deepspeed --hostfile "$HOSTFILE" \
  --module pretrain train --config configs/pretrain/pad_vitb.yaml \
  --run-dir "$RUN_DIR" "data.shards=[{path: $SHARDS}]" "init.checkpoint=$INIT" "$@"
