#!/usr/bin/env bash
# Download the wheels listed in wheels.txt for the GPU node (CPython 3.12, manylinux x86_64) into
# benchmarks/gpu/wheels/ (or $1), with no dependencies resolved: the list is the whole set. Fails when
# the folder ends up over 64 MiB, the most a check may bring along.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dest="${1:-$here/wheels}"
python="${PYTHON:-python3}"
mkdir -p "$dest"
mapfile -t reqs < <(grep -v '^\s*#' "$here/wheels.txt" | awk 'NF {print $1}')
"$python" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dest" "${reqs[@]}"
bytes=$(du -sb "$dest" | cut -f1)
echo "wheels: $((bytes / 1024)) KiB in $dest"
if (( bytes > 64 * 1024 * 1024 )); then
    echo "error: $dest holds more than 64 MiB" >&2
    exit 1
fi
