#!/usr/bin/env bash
# A Docker engine for tests/integration/cluster/test_docker.py, from Debian's packages:
#   docker.io       dockerd, and a client that builds with BuildKit (20.10: built in)
#   docker-compose  Compose v1, where `docker compose` (v2) is not installed
#   debootstrap     the images' base: there is no image registry to pull one from
# Starts dockerd where no engine answers, logging to /var/log/dockerd.log. Its bridge and the
# networks it hands out take addresses in 10.78.0.0/16, a subnet no other test uses (the
# network-namespace hosts of tests/integration/cluster/hosts.py are 10.77.0.0/24).
# Idempotent; needs root. Called by .ci/run's image stage and by the test where no engine answers.
set -euo pipefail
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
{ docker compose version || command -v docker-compose; } >/dev/null 2>&1 || missing+=(docker-compose)
if [ "${#missing[@]}" -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
if ! docker info >/dev/null 2>&1; then
    # A dockerd that was killed leaves its pid file; another process may hold that pid by now.
    pid_file=/var/run/docker.pid
    if [ -f "$pid_file" ] && ! grep -qx dockerd "/proc/$(cat "$pid_file")/comm" 2>/dev/null; then
        rm -f "$pid_file"
    fi
    setsid dockerd --bip 10.78.255.1/24 --default-address-pool base=10.78.0.0/17,size=24 \
        >>/var/log/dockerd.log 2>&1 </dev/null &
    for _ in $(seq 60); do
        docker info >/dev/null 2>&1 && exit 0
        sleep 1
    done
    echo "setup_docker.sh: dockerd did not answer within 60 s; its log, /var/log/dockerd.log, ends:" >&2
    tail -n 20 /var/log/dockerd.log >&2
    exit 1
fi
