#!/usr/bin/env bash
# What a user installs, run as a user would: from a directory outside the repository, on an install that is
# not editable. Usage: .ci/install_check.sh VENV   (VENV already holds the wheel or the sdist)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=$(cd "$1" && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"
export HF_HUB_OFFLINE=1
run() { echo "+ $*"; "$@"; }
run "$VENV/bin/pathsurgeon" --version
run "$VENV/bin/pathsurgeon" add --model test_vit --rate 0.1 --out "$WORK/vit_dp" --json "$WORK/plan.json"
run "$VENV/bin/pathsurgeon" strip --in "$WORK/vit_dp" --out "$WORK/vit_clean"
run "$VENV/bin/pathsurgeon" export --in "$WORK/vit_dp" --onnx "$WORK/vit.onnx"
test -s "$WORK/vit_dp/model.safetensors" && test -s "$WORK/vit_clean/pathsurgeon.json" && test -s "$WORK/vit.onnx"
run "$VENV/bin/python" "$ROOT/.ci/smoke.py" "$ROOT/README.md"
echo "install check passed: $("$VENV/bin/pathsurgeon" --version) in $VENV"
