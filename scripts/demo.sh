#!/usr/bin/env bash
# Set up .venv and run the main job: train IWM on the bundled images on the CPU, then evaluate it.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/venv.sh"
cd "$root"
exec .venv/bin/iwm-train configs/demo_cpu.yaml "$@"
