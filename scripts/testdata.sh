#!/usr/bin/env bash
# Prepare real images for the test suite, outside the repo, without any container registry.
#
# python:3.12-alpine comes as an OCI layout shipped as package data in the PyPI wheel
# flashvm==0.1.3 (see shared/testdata/README.md). Only the image data is unpacked: the wheel
# is never installed and none of its code runs. Idempotent: an existing layout is kept.
set -euo pipefail

DEST="${MATCHLOCK_TESTDATA:-$HOME/.cache/matchlock-testdata}"
# Any Python with pip will do (pip only downloads here); prefer the project's venv.
venv_python="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python"
if [[ -z "${PYTHON:-}" && -x "$venv_python" ]]; then
    PYTHON="$venv_python"
fi
PYTHON="${PYTHON:-python3}"
WHEEL_SHA256=c199e9945e0b28e88678fd0c136abd0f4828087658ca6373ebd009a8b59a6ed0
LAYOUT="$DEST/python-3.12-alpine"

if [[ -f "$LAYOUT/oci-layout" && -f "$LAYOUT/index.json" ]]; then
    echo "testdata: $LAYOUT already present"
    exit 0
fi

mkdir -p "$DEST"
# Work in a scratch dir next to the destination so the final step is a same-filesystem rename:
# a half-finished download never looks like a usable layout.
work="$(mktemp -d "$DEST/.prepare.XXXXXX")"
trap 'rm -rf "$work"' EXIT

"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: \
    --platform manylinux_2_39_x86_64 --python-version 3.11 \
    -d "$work/dl" flashvm==0.1.3

shopt -s nullglob
wheels=("$work"/dl/flashvm-0.1.3-*.whl)
if [[ ${#wheels[@]} -ne 1 ]]; then
    echo "testdata: expected one flashvm-0.1.3 wheel, found ${#wheels[@]}" >&2
    exit 1
fi
echo "$WHEEL_SHA256  ${wheels[0]}" | sha256sum --check --quiet -

unzip -q "${wheels[0]}" 'flashvm/data/oci/*' -d "$work/x"
if [[ ! -f "$work/x/flashvm/data/oci/oci-layout" ]]; then
    echo "testdata: the wheel has no OCI layout under flashvm/data/oci" >&2
    exit 1
fi
rm -rf "$LAYOUT"
mv "$work/x/flashvm/data/oci" "$LAYOUT"
echo "testdata: python:3.12-alpine OCI layout ready at $LAYOUT"
