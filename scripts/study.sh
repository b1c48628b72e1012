#!/usr/bin/env bash
# The IWM paper's study in miniature on the bundled digits (about 30 minutes on a 2-core CPU; not part of CI):
# I-JEPA, small- and large-predictor IWM, each trained, evaluated and predictor-fine-tuned.
# Writes runs/study/study.csv, study.md and study.png. Extra arguments go to python -m iwm_fast.study.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/venv.sh"
cd "$root"
exec .venv/bin/python -m iwm_fast.study "$@"
