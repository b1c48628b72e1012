#!/usr/bin/env bash
# The third CI pass, on the newest torch the machines install (torch 2.14.1 + triton 3.8.0, torchvision 0.29.1)
# with transformers 5 and timm, installed as a user installs it: torch first (.venv-torch214), then
# `pip install --no-build-isolation .` (not editable; the C++ extension is built against that torch, CPU-only
# here: PyPI's torch 2.14.1 is the CUDA build and runs on the CPU). Then, from another directory, a short job (the
# installed extension loads, two training steps, an export that transformers loads), and the integration, export,
# kernel, op, compile and engine tests against the installed package: `python -P` keeps the clone's root off
# sys.path, where its top-level kernels/ folder would shadow the `kernels` package transformers imports.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
venv="$root/.venv-torch214"
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
"${pip[@]}" torch==2.14.1 triton==3.8.0 torchvision==0.29.1 "transformers>=5.25,<6" "timm>=1.0.31" \
  "safetensors>=0.8" numpy pybind11 setuptools wheel ninja pytest pyyaml scikit-learn pillow matplotlib \
  tensorboard tqdm xxhash
# The install is redone only when the package's files change (a build takes minutes on two cores).
key=$(git ls-files -z --cached --others --exclude-standard | xargs -0 cat | sha256sum | cut -c1-16)
stamp="$venv/.iwm_fast_installed"
if [ "$(cat "$stamp" 2>/dev/null)" != "$key" ]; then
  IWM_FAST_CUDA=0 "${pip[@]}" --no-build-isolation --no-deps --force-reinstall .
  echo "$key" > "$stamp"
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(
cd "$work"
"$venv/bin/python" - <<'PY'
import iwm_fast, iwm_fast.kernels
from iwm_fast.masks import _ops
assert iwm_fast.__file__.startswith(__import__("sysconfig").get_paths()["purelib"]), iwm_fast.__file__
assert iwm_fast.kernels.__file__.startswith(__import__("os").path.dirname(iwm_fast.__file__)), iwm_fast.kernels.__file__
assert _ops.HAS_EXT, f"iwm_fast._C did not load: {_ops.IMPORT_ERROR}"
print("installed:", iwm_fast.__file__, "| C++ extension loaded, CUDA kernels:", _ops.cuda_available_in_ext())
PY
"$venv/bin/iwm-train" "$root/configs/demo_cpu.yaml" model.size=tiny model.depth=1 data.image_size=24 \
  data.num_workers=0 predictor.depth=1 predictor.width=48 train.batch_size=8 train.steps=2 train.warmup_steps=1 \
  train.checkpoint_every=2 eval.enabled=false train.device=cpu "train.out_dir=$work/run" > "$work/train.log" 2>&1 \
  || { cat "$work/train.log"; exit 1; }
"$venv/bin/iwm-export" "$work/run" "$work/hf" --format hf --dtype bf16
"$venv/bin/python" - "$work/hf" <<'PY'
import sys, torch, transformers
model = transformers.IJepaModel.from_pretrained(sys.argv[1])
print("transformers loads the export:", type(model).__name__, model.dtype, tuple(model(torch.zeros(1, 3, 24, 24,
      dtype=model.dtype)).last_hidden_state.shape))
PY
echo "install check passed: non-editable install, two training steps and an export run from another directory"
)
export TRITON_INTERPRET=1
tests=("$@")  # default: the integration and export tests, then the kernel, op, compile and engine tests
[ ${#tests[@]} -gt 0 ] || tests=(tests/test_hf.py tests/test_timm.py tests/test_export.py tests/test_setup.py tests/test_patch.py
  tests/test_rope_patch.py tests/test_attention.py tests/test_gather.py tests/test_ema.py tests/test_masks_ext.py
  tests/test_models.py tests/test_engine.py tests/test_host_reads.py tests/test_ops_opcheck.py)
exec "$venv/bin/python" -P -m pytest -q -p no:cacheprovider "${tests[@]}"
