#!/usr/bin/env bash
# The second CI pass: the kernel, op, compile and engine tests on the GPU machines' versions (torch 2.11.0 +
# triton 3.6.0), in their own venv (.venv-torch211) and on a copy of the tree whose C++ extension is built
# against that torch (an extension is tied to the torch it was built with; the main tree's is 2.13's).
# PyPI's torch 2.11.0 is the CUDA build; it runs on the CPU, and the extension is built CPU-only here.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
py=${PYTHON:-python3}
venv=.venv-torch211
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
"${pip[@]}" torch==2.11.0 triton==3.6.0 numpy pybind11 setuptools wheel ninja pytest pyyaml scikit-learn pillow \
  matplotlib tensorboard tqdm xxhash
tree=build/torch211-tree
rm -rf "$tree"
mkdir -p "$tree"
git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$tree"
# The extension is rebuilt only when its sources change (a build takes minutes on two cores).
key=$(cat setup.py csrc/* | sha256sum | cut -c1-16)
cache="build/torch211-ext/$key"
if ! ls "$cache"/_C*.so >/dev/null 2>&1; then
  (cd "$tree" && IWM_FAST_CUDA=0 "$root/$venv/bin/python" setup.py -q build_ext --inplace >/dev/null)
  rm -rf build/torch211-ext && mkdir -p "$cache" && cp "$tree"/iwm_fast/_C*.so "$cache"/
fi
cp "$cache"/_C*.so "$tree/iwm_fast/"
cd "$tree"
export TRITON_INTERPRET=1 PYTHONPATH="$PWD"
tests=("$@")  # default: the kernel, op, compile and engine tests
[ ${#tests[@]} -gt 0 ] || tests=(tests/test_attention.py tests/test_gather.py tests/test_ema.py tests/test_masks_ext.py
  tests/test_models.py tests/test_engine.py tests/test_host_reads.py tests/test_ops_opcheck.py)
exec "$root/$venv/bin/python" -m pytest -q -p no:cacheprovider "${tests[@]}"
