#!/usr/bin/env bash
# The wheels bench/device_check.sh installs on a GPU machine that reaches no package index: DeepSpeed
# (built here, no ops: they JIT-compile there) and the pure or binary packages it imports that a CUDA
# PyTorch image usually lacks, for every CPython the device may run (the binary ones once per version;
# device_check.sh lets pip pick the one that fits). Run it here, where PyPI answers, then carry the
# folder with the device call (`carry: [".whl"]`).
#
#   bench/device_wheels.sh [FOLDER]        # default .whl; DEEPSPEED_VERSION, PYTHON_VERSIONS override
set -euo pipefail
cd "$(dirname "$0")/.."
FOLDER="${1:-.whl}"
DEEPSPEED_VERSION="${DEEPSPEED_VERSION:-0.19.8}"
PYTHON_VERSIONS="${PYTHON_VERSIONS:-3.10 3.11 3.12 3.13}"
PYTHON="${PYTHON:-python3}"
PURE=(hjson pydantic annotated-types typing-inspection)
BINARY=(pydantic-core)

if [ -e "$FOLDER" ] && [ -n "$(ls -A "$FOLDER" 2>/dev/null)" ]; then
    echo "device_wheels: $FOLDER exists and is not empty; name an empty or new folder" >&2
    exit 2
fi
staging="$(mktemp -d "${TMPDIR:-/tmp}/dsexit-wheels.XXXXXX")"
trap 'rm -rf "$staging"' EXIT

DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation --wheel-dir "$staging" \
    "deepspeed==$DEEPSPEED_VERSION"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --dest "$staging" "${PURE[@]}"
# pydantic pins its core exactly: the core wheels of that version, one per CPython.
core_version="$("$PYTHON" -c '
import pathlib, re, sys, zipfile
[wheel] = pathlib.Path(sys.argv[1]).glob("pydantic-*.whl")
with zipfile.ZipFile(wheel) as archive:
    metadata = next(name for name in archive.namelist() if name.endswith(".dist-info/METADATA"))
    match = re.search(r"^Requires-Dist: pydantic-core==([^\s;]+)", archive.read(metadata).decode(), re.M)
print(match.group(1) if match else "")
' "$staging")"
[ -n "$core_version" ] || { echo "device_wheels: pydantic's metadata names no pydantic-core version" >&2; exit 1; }
for version in $PYTHON_VERSIONS; do
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --dest "$staging" \
        --platform manylinux2014_x86_64 --python-version "$version" "${BINARY[0]}==$core_version"
done
mkdir -p "$FOLDER"
mv "$staging"/*.whl "$FOLDER"/
ls -1 "$FOLDER"
du -sh "$FOLDER"
