#!/usr/bin/env bash
# The third CI pass: the newest torch the machines install (torch 2.14.1 + triton 3.8.0, torchvision 0.29.1),
# with transformers 5 and timm, in its own venv (.venv-torch214) and on a copy of the tree whose C++ extension is
# built against that torch (an extension is tied to the torch it was built with). Here run the integration tests
# against transformers' and timm's own models (the other passes have neither), the export, the install checks,
# and the kernel, op, compile and engine tests. PyPI's torch 2.14.1 is the CUDA build; it runs on the CPU, and the
# extension is built CPU-only here.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
py=${PYTHON:-python3}
venv=.venv-torch214
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
"${pip[@]}" torch==2.14.1 triton==3.8.0 torchvision==0.29.1 "transformers>=5.25,<6" "timm>=1.0.31" \
  "safetensors>=0.8" numpy pybind11 setuptools wheel ninja pytest pyyaml scikit-learn pillow matplotlib \
  tensorboard tqdm xxhash
tree=build/torch214-tree
rm -rf "$tree"
mkdir -p "$tree"
git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$tree"
# The Triton kernels go where an installed wheel has them (iwm_fast/kernels): a top-level kernels/ folder on
# sys.path would shadow the `kernels` package that transformers imports.
mv "$tree/kernels" "$tree/iwm_fast/kernels"
# The extension is rebuilt only when its sources change (a build takes minutes on two cores).
key=$(cat setup.py csrc/* | sha256sum | cut -c1-16)
cache="build/torch214-ext/$key"
if ! ls "$cache"/_C*.so >/dev/null 2>&1; then
  (cd "$tree" && IWM_FAST_CUDA=0 "$root/$venv/bin/python" setup.py -q build_ext --inplace >/dev/null)
  rm -rf build/torch214-ext && mkdir -p "$cache" && cp "$tree"/iwm_fast/_C*.so "$cache"/
fi
cp "$cache"/_C*.so "$tree/iwm_fast/"
cd "$tree"
export TRITON_INTERPRET=1 PYTHONPATH="$PWD"
tests=("$@")  # default: the integration and export tests, then the kernel, op, compile and engine tests
[ ${#tests[@]} -gt 0 ] || tests=(tests/test_hf.py tests/test_timm.py tests/test_export.py tests/test_setup.py tests/test_patch.py
  tests/test_rope_patch.py tests/test_attention.py tests/test_gather.py tests/test_ema.py tests/test_masks_ext.py
  tests/test_models.py tests/test_engine.py tests/test_host_reads.py tests/test_ops_opcheck.py)
exec "$root/$venv/bin/python" -m pytest -q -p no:cacheprovider "${tests[@]}"
