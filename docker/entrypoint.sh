#!/usr/bin/env bash
# One DeepSpeed launcher per node, no ssh: Docker/Compose, Kubernetes (an indexed Job or
# StatefulSet), Slurm (`srun --ntasks-per-node=1 docker/entrypoint.sh ...`).
#
#   NNODES          nodes in the job                                   (default 1)
#                   or MIN:MAX: an elastic job under torchrun's agent, on any number of nodes in that
#                   range; it re-forms without a lost node and grows back when one returns
#   NODE_RANK       this node's index in [0, NNODES)                   (default 0; Slurm: SLURM_NODEID)
#                   (elastic: node 0 hosts the rendezvous store; ranks are ordered by LOCAL_ADDR)
#   MASTER_ADDR     address of node 0, reachable from every node       (required when NNODES > 1)
#   MASTER_PORT     rendezvous port on node 0                          (default 29500)
#   MAX_RESTARTS    elastic: worker restarts after a failure, such as a lost node (default 3;
#                   a node joining does not count)
#   RDZV_CONF       elastic: more torchrun --rdzv-conf settings (e.g. last_call_timeout=10)
#   LOCAL_ADDR      elastic: this node's address as the others reach it (default: its host name)
#   DSEXIT_JOB_ID   elastic: the rendezvous id, the same on every node  (default dsexit)
#   MASTER_ADDR_WAIT  seconds to wait for MASTER_ADDR to resolve          (default 120; containers start in
#                     any order, so node 0's name may not exist yet)
#   NPROC_PER_NODE  processes per node: GPUs, or CPU processes         (default: GPUs seen by nvidia-smi, else 1)
#   DS_CONFIG       DeepSpeed config                                   (default ds_configs/zero2.json)
# Arguments are passed to launch/pretrain.py. On CPU-only nodes set GLOO_SOCKET_IFNAME to
# the interface the nodes reach each other on when the hostname does not resolve to it.
#
# Preemption (docker stop, Kubernetes, Slurm): SIGTERM or SIGINT to this script - from the
# image's init (tini, PID 1), or to its whole process group - makes the trainer save a
# checkpoint and every process exit; the script then exits 0. DeepSpeed's runner has no
# SIGTERM handler here, and its per-node launcher answers one by killing the ranks after
# 30 s and exiting 1, so the runner starts with both signals ignored and this script sends
# them to the training ranks alone. Allow the save in the stop timeout (docker stop -t,
# compose stop_grace_period, Kubernetes terminationGracePeriodSeconds; 10 s/30 s by default).
# Exit codes: the trainer's (0 done or preempted, 2 a user error, 3 a lost peer), else the launcher's.
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."

fail() {
    echo "entrypoint.sh: $*" >&2
    exit 2
}
# require_integer NAME VALUE MIN [MAX [WHY]]: one line naming the variable, exit 2, before anything starts.
require_integer() {
    local name=$1 value=$2 min=$3 max=${4:-} why=${5:-}
    if ! [[ "$value" =~ ^[0-9]{1,9}$ ]] || ((10#$value < min)) || { [ -n "$max" ] && ((10#$value > max)); }; then
        if [ -n "$max" ]; then
            fail "$name='$value' is invalid; expected an integer from $min to $max$why."
        fi
        fail "$name='$value' is invalid; expected an integer >= $min."
    fi
    printf '%d' "$((10#$value))"
}

NNODES="${NNODES:-1}"
ELASTIC=""
if [[ "$NNODES" == *:* ]]; then  # MIN:MAX
    if ! [[ "$NNODES" =~ ^([0-9]{1,6}):([0-9]{1,6})$ ]] || ((10#${BASH_REMATCH[1]} < 1)) ||
        ((10#${BASH_REMATCH[2]} < 10#${BASH_REMATCH[1]})); then
        fail "NNODES='$NNODES' is invalid; expected a node count, or MIN:MAX with 1 <= MIN <= MAX (an elastic job)."
    fi
    ELASTIC="$((10#${BASH_REMATCH[1]})):$((10#${BASH_REMATCH[2]}))"
    NNODES="${ELASTIC#*:}"
    MAX_RESTARTS="$(require_integer MAX_RESTARTS "${MAX_RESTARTS:-3}" 0)"
fi
NNODES="$(require_integer NNODES "$NNODES" 1)"
NODE_RANK="$(require_integer NODE_RANK "${NODE_RANK:-${SLURM_NODEID:-0}}" 0 "$((NNODES - 1))" " (NNODES=${ELASTIC:-$NNODES})")"
MASTER_PORT="$(require_integer MASTER_PORT "${MASTER_PORT:-29500}" 1 65535)"
DS_CONFIG="${DS_CONFIG:-ds_configs/zero2.json}"
if [ -z "${NPROC_PER_NODE:-}" ]; then
    NPROC_PER_NODE="$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)"
    [ "$NPROC_PER_NODE" -gt 0 ] || NPROC_PER_NODE=1
fi
NPROC_PER_NODE="$(require_integer NPROC_PER_NODE "$NPROC_PER_NODE" 1)"
if [ "$NNODES" -gt 1 ] && [ -z "${MASTER_ADDR:-}" ]; then
    fail "MASTER_ADDR must name node 0 when NNODES=$NNODES."
fi
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_ADDR_WAIT="$(require_integer MASTER_ADDR_WAIT "${MASTER_ADDR_WAIT:-120}" 0)"
# A name that never resolves would leave every rank waiting on the rendezvous for the whole
# --dist-timeout: wait a bounded time for it (node 0's container may start last), then say so.
waited=0
until getent ahosts "$MASTER_ADDR" >/dev/null 2>&1; do  # getaddrinfo: an IP address needs no lookup
    if ((waited >= MASTER_ADDR_WAIT)); then
        fail "MASTER_ADDR='$MASTER_ADDR' did not resolve to an address within ${MASTER_ADDR_WAIT}s (MASTER_ADDR_WAIT); expected node 0's host name or IP address."
    fi
    sleep 1
    waited=$((waited + 1))
done
if [ "$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)" = 0 ]; then
    export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
fi

# --no_ssh still reads the node list from a hostfile; only the line count and slots matter.
HOSTFILE="$(mktemp -t dsexit-hostfile.XXXXXX)"
# The trainer's local rank 0 writes why it stopped here ("preempted", "finished"): the launcher's
# own exit code after a signal says nothing about whether the checkpoint was saved.
export DSEXIT_EXIT_STATUS_FILE="$(mktemp -t dsexit-exit.XXXXXX)"
trap 'rm -f "$HOSTFILE" "$DSEXIT_EXIT_STATUS_FILE"' EXIT
for ((node = 0; node < NNODES; node++)); do echo "node$node slots=$NPROC_PER_NODE"; done > "$HOSTFILE"

run_deepspeed() {
    trap '' TERM INT  # inherited by the runner through exec (the launcher below it installs its own handlers)
    exec deepspeed --hostfile "$HOSTFILE" --no_ssh --node_rank "$NODE_RANK" \
        --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --num_gpus "$NPROC_PER_NODE" \
        launch/pretrain.py --deepspeed "$DS_CONFIG" "$@"
}

# Elastic: torchrun's agent on every node. Node 0 hosts the rendezvous store (MASTER_ADDR:MASTER_PORT):
# the job survives the loss of any other node, not of node 0. A lost node fails a local worker (a closed
# connection, or the trainer's heartbeat), the agent restarts its workers in a new rendezvous, and they
# resume from the newest checkpoint at the new world size; a node that starts again joins at the next one.
run_torchrun() {
    trap '' TERM INT  # as above: the ranks get this script's signal; the agent installs its own handlers
    local is_host=0
    [ "$NODE_RANK" != 0 ] || is_host=1
    # The workers' own store, not the agent's: torch 2.13's shared store is not announced again after a
    # membership change, so a node that joins a running job waits for its address until it times out.
    export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
    exec torchrun --nnodes "$ELASTIC" --nproc-per-node "$NPROC_PER_NODE" --rdzv-backend c10d \
        --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "${DSEXIT_JOB_ID:-dsexit}" \
        --rdzv-conf "is_host=$is_host${RDZV_CONF:+,$RDZV_CONF}" --max-restarts "$MAX_RESTARTS" \
        ${LOCAL_ADDR:+--local-addr "$LOCAL_ADDR"} launch/pretrain.py --deepspeed "$DS_CONFIG" "$@"
}

SIGNALLED=""
INTERRUPTED=0
children_of() { pgrep -P "$1" 2>/dev/null || cat /proc/"$1"/task/*/children 2>/dev/null || true; }
# forward SIGNAL: SIGTERM to the ranks (children of the per-node launcher, the runner's child; under
# torchrun, the agent's children), for SIGINT too (a terminal's Ctrl-C also reaches them directly, and
# three SIGINTs skip the save). Before the ranks exist there is nothing to save: the launcher (or the
# runner itself) is stopped.
forward() {
    SIGNALLED=$1
    INTERRUPTED=1
    local launcher ranks
    if [ -n "$ELASTIC" ]; then
        launcher="$RUNNER"
    else
        launcher="$(children_of "$RUNNER" | head -n 1)"
    fi
    ranks="$([ -z "$launcher" ] || children_of "$launcher")"
    echo "entrypoint.sh: SIG$1: asking the trainer (pid(s) $(echo $ranks)) to save a checkpoint and exit" >&2
    if [ -n "$ranks" ]; then
        kill -s TERM $ranks 2>/dev/null || true
        if [ -n "$ELASTIC" ]; then
            # Once the ranks have saved and exited, the agent goes too, at once and without closing the
            # rendezvous, so that the other nodes go on without this one: an agent whose workers finished
            # waits for every other agent in an exit barrier that no signal interrupts, then closes the
            # rendezvous for every node. Its workers are gone, so nothing is lost with it.
            (
                while kill -0 $ranks 2>/dev/null; do sleep 0.5; done
                echo "entrypoint.sh: the ranks have exited; ending this node's elastic agent" >&2
                kill -s KILL "$RUNNER" 2>/dev/null
            ) &
        fi
    elif [ -n "$launcher" ]; then
        kill -s TERM "$launcher" 2>/dev/null || true
    else
        kill -s KILL "$RUNNER" 2>/dev/null || true
    fi
}

if [ -n "$ELASTIC" ]; then
    echo "entrypoint.sh: node $NODE_RANK, elastic job of $ELASTIC nodes, $NPROC_PER_NODE process(es) per node," \
        "rendezvous $MASTER_ADDR:$MASTER_PORT, up to $MAX_RESTARTS restart(s)" >&2
    run_torchrun "$@" &
else
    echo "entrypoint.sh: node $NODE_RANK of $NNODES, $NPROC_PER_NODE process(es), master $MASTER_ADDR:$MASTER_PORT" >&2
    run_deepspeed "$@" &
fi
RUNNER=$!
trap 'forward TERM' TERM
trap 'forward INT' INT
while :; do
    INTERRUPTED=0
    STATUS=0
    wait "$RUNNER" || STATUS=$?
    [ "$INTERRUPTED" = 1 ] || break  # a trap ended the wait, not the runner: wait on
done
if [ -n "$SIGNALLED" ] && [ "$STATUS" != 0 ] && grep -qx preempted "$DSEXIT_EXIT_STATUS_FILE"; then
    echo "entrypoint.sh: the launcher exited $STATUS after SIG$SIGNALLED, but the trainer saved its checkpoint and stopped cleanly" >&2
    STATUS=0
fi
exit "$STATUS"
