#!/usr/bin/env bash
# Run a recipe on several nodes with torchrun: start this script once on every node.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 bash recipes/launch/torchrun.sh recipes/llama-8b-lora-fsdp2.yaml
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 bash recipes/launch/torchrun.sh recipes/llama-8b-lora-fsdp2.yaml
# Lightning reads torchrun's environment; the recipe's trainer.devices must equal --nproc_per_node and
# trainer.num_nodes must equal --nnodes (set here on the command line).
set -euo pipefail
RECIPE=${1:?usage: torchrun.sh RECIPE.yaml [--section.key=value ...]}
shift
GPUS=${GPUS:-8}
NNODES=${NNODES:-1}
torchrun \
  --nnodes="$NNODES" --node_rank="${NODE_RANK:-0}" --nproc_per_node="$GPUS" \
  --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-29500}" \
  -m finetune "$RECIPE" --trainer.devices="$GPUS" --trainer.num_nodes="$NNODES" "$@"
