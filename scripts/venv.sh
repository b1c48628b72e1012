#!/usr/bin/env bash
# Create or reuse .venv in the repository root and install iwm-fast into it (editable, C++ extension built in place).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
py=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$py" -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints/cpu-test.txt)
# torch must be present before setup.py runs: the extension is built with torch's own build tools.
"${pip[@]}" torch triton numpy pybind11 setuptools wheel ninja
stamp=.venv/.iwm_fast_installed
if [ ! -f "$stamp" ] || [ -n "$(find setup.py pyproject.toml csrc -newer "$stamp" 2>/dev/null | head -n 1)" ]; then
  "${pip[@]}" --no-build-isolation --use-pep517 -e ".[dev]"
  touch "$stamp"
fi
