#!/usr/bin/env bash
# Create .venv and install dsexit with its test extras. torch is pinned here, not in
# pyproject.toml: an unpinned torch resolves to a multi-GB CUDA build on CPU machines.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==${DSEXIT_TORCH_VERSION:-2.13.0}"
python -m pip install -q -e ".[test,s3]"
./scripts/setup_system.sh  # system packages and MPI wheels for tests/integration/cluster
