#!/usr/bin/env bash
# One DeepSpeed launcher per node, no ssh: Docker/Compose, Kubernetes (an indexed Job or
# StatefulSet), Slurm (`srun --ntasks-per-node=1 docker/entrypoint.sh ...`).
#
#   NNODES          nodes in the job                                   (default 1)
#   NODE_RANK       this node's index in [0, NNODES)                   (default 0; Slurm: SLURM_NODEID)
#   MASTER_ADDR     address of node 0, reachable from every node       (required when NNODES > 1)
#   MASTER_PORT     rendezvous port on node 0                          (default 29500)
#   NPROC_PER_NODE  processes per node: GPUs, or CPU processes         (default: GPUs seen by nvidia-smi, else 1)
#   DS_CONFIG       DeepSpeed config                                   (default ds_configs/zero2.json)
# Arguments are passed to launch/pretrain.py. On CPU-only nodes set GLOO_SOCKET_IFNAME to
# the interface the nodes reach each other on when the hostname does not resolve to it.
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."

NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-0}}"
MASTER_PORT="${MASTER_PORT:-29500}"
DS_CONFIG="${DS_CONFIG:-ds_configs/zero2.json}"
if [ -z "${NPROC_PER_NODE:-}" ]; then
    NPROC_PER_NODE="$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)"
    [ "$NPROC_PER_NODE" -gt 0 ] || NPROC_PER_NODE=1
fi
if [ "$NNODES" -gt 1 ] && [ -z "${MASTER_ADDR:-}" ]; then
    echo "entrypoint.sh: MASTER_ADDR must name node 0 when NNODES=$NNODES." >&2
    exit 2
fi
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
if [ "$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)" = 0 ]; then
    export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
fi

# --no_ssh still reads the node list from a hostfile; only the line count and slots matter.
HOSTFILE="$(mktemp -t dsexit-hostfile.XXXXXX)"
for ((node = 0; node < NNODES; node++)); do echo "node$node slots=$NPROC_PER_NODE"; done > "$HOSTFILE"

echo "entrypoint.sh: node $NODE_RANK of $NNODES, $NPROC_PER_NODE process(es), master $MASTER_ADDR:$MASTER_PORT" >&2
exec deepspeed --hostfile "$HOSTFILE" --no_ssh --node_rank "$NODE_RANK" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --num_gpus "$NPROC_PER_NODE" \
    launch/pretrain.py --deepspeed "$DS_CONFIG" "$@"
