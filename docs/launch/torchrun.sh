#!/usr/bin/env bash
# PAD pre-training of ViT-B on one or more nodes with torchrun.
# One node:   NNODES=1 ./torchrun.sh
# Each node of N (same command on every node, NODE_RANK 0..N-1, MASTER_ADDR = node 0):
#   NNODES=4 NODE_RANK=$i MASTER_ADDR=node0 ./torchrun.sh
# Re-running the same command after a crash or preemption resumes from the latest checkpoint.
# Elastic (nodes may join or leave; MIN:MAX nodes, the same command on each; train.effective_batch, set in
# pad_vitb.yaml, keeps the global batch as the world changes; README: Launching):
#   python -m pretrain.engine.launchers torchrun --nnodes 2:4 --nproc_per_node 8 --rdzv-backend c10d \
#     --rdzv-endpoint node0:29400 --rdzv-id pad_vitb --max-restarts 10 -m pretrain train ...
set -euo pipefail
: "${NNODES:=1}" "${NODE_RANK:=0}" "${MASTER_ADDR:=127.0.0.1}" "${MASTER_PORT:=29500}" "${GPUS:=8}"
: "${RUN_DIR:=runs/pad_vitb}" "${SHARDS:=shards/msip}" "${INIT:=weights/mae_pretrain_vit_base.pth}"
# torchrun with the same arguments; a stop on Ctrl-C / SIGTERM ends in one line (README: Preemption)
exec python -m pretrain.engine.launchers torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  -m pretrain train --config configs/pretrain/pad_vitb.yaml --run-dir "$RUN_DIR" \
  "data.shards=[{path: $SHARDS}]" "init.checkpoint=$INIT" "$@"
