#!/usr/bin/env bash
# Set up .venv, lint (ruff), and run the whole test suite on the CPU (Triton kernels under the interpreter).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/venv.sh"
cd "$root"
.venv/bin/ruff check .
export TRITON_INTERPRET=1
exec .venv/bin/python -m pytest -q tests "$@"
