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
test -s "$WORK/vit_dp/model.safetensors" && test -s "$WORK/vit_clean/pathsurgeon.json"
# ONNX export needs a newer torch than the floor (pathsurgeon.versions.ONNX_EXPORT_TORCH): below it, one line, exit 2
if "$VENV/bin/python" -c "import sys, pathsurgeon.versions as v; sys.exit(v.installed('torch') < v.ONNX_EXPORT_TORCH)"; then
    run "$VENV/bin/pathsurgeon" export --in "$WORK/vit_dp" --onnx "$WORK/vit.onnx"
    test -s "$WORK/vit.onnx"
else
    echo "+ pathsurgeon export (expected: refused, this torch is older than export needs)"
    status=0
    "$VENV/bin/pathsurgeon" export --in "$WORK/vit_dp" --onnx "$WORK/vit.onnx" 2> "$WORK/export.err" || status=$?
    cat "$WORK/export.err"
    test "$status" -eq 2 && grep -q "needs torch >= " "$WORK/export.err" && test "$(wc -l < "$WORK/export.err")" -eq 1
    test ! -e "$WORK/vit.onnx"
fi
run "$VENV/bin/python" "$ROOT/.ci/smoke.py" "$ROOT/README.md"
echo "install check passed: $("$VENV/bin/pathsurgeon" --version) in $VENV"
