#!/usr/bin/env bash
# The whole test suite: static checks, then unit and VM tests (real QEMU microVMs).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check src tests benchmarks
.venv/bin/mypy
bash scripts/testdata.sh
exec .venv/bin/pytest -q -p no:cacheprovider "$@"
