#!/usr/bin/env bash
# Install iwm-fast as a user does: non-editable (`pip install --no-build-isolation .`) into a fresh environment
# that already has its torch (the torch 2.14.1 venv's packages, made visible by a .pth file, as a user installs
# torch first), then run a short job from another directory: import checks, two training steps, an export that
# transformers loads. Run after scripts/test_torch214.sh (which creates .venv-torch214).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
base="$root/.venv-torch214"
[ -x "$base/bin/python" ] || { echo "test_install.sh: run scripts/test_torch214.sh first (it creates $base)"; exit 2; }
env="$root/build/install-venv"
rm -rf "$env"
"${PYTHON:-python3}" -m venv "$env"
purelib() { "$1/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }
purelib "$base" > "$(purelib "$env")/torch214.pth"
# The CPU-only extension (IWM_FAST_CUDA=0): a CUDA build would take the two CI cores many minutes.
IWM_FAST_CUDA=0 "$env/bin/python" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps .
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
"$env/bin/python" - <<'PY'
import iwm_fast, iwm_fast.kernels
from iwm_fast.masks import _ops
assert iwm_fast.__file__.startswith(__import__("sysconfig").get_paths()["purelib"]), iwm_fast.__file__
assert iwm_fast.kernels.__file__.startswith(__import__("os").path.dirname(iwm_fast.__file__)), iwm_fast.kernels.__file__
assert _ops.HAS_EXT, f"iwm_fast._C did not load: {_ops.IMPORT_ERROR}"
print("installed:", iwm_fast.__file__, "| C++ extension loaded, CUDA kernels:", _ops.cuda_available_in_ext())
PY
"$env/bin/iwm-train" "$root/configs/demo_cpu.yaml" model.size=tiny model.depth=1 data.image_size=24 \
  data.num_workers=0 predictor.depth=1 predictor.width=48 train.batch_size=8 train.steps=2 train.warmup_steps=1 \
  train.checkpoint_every=2 eval.enabled=false train.device=cpu "train.out_dir=$work/run" > "$work/train.log" 2>&1 \
  || { cat "$work/train.log"; exit 1; }
"$env/bin/iwm-export" "$work/run" "$work/hf" --format hf --dtype bf16
"$env/bin/python" - "$work/hf" <<'PY'
import sys, torch, transformers
model = transformers.IJepaModel.from_pretrained(sys.argv[1])
print("transformers loads the export:", type(model).__name__, model.dtype, tuple(model(torch.zeros(1, 3, 24, 24,
      dtype=model.dtype)).last_hidden_state.shape))
PY
echo "install check passed: non-editable install, two training steps and an export run from another directory"
