#!/usr/bin/env bash
# Set up mmtune's CPU development environment on a fresh machine, in one go.
#
# Creates ./.venv (override with MMTUNE_VENV) holding torch 2.13.0 (CPU),
# mmengine 0.10.7, mmcv 2.1.0 built from source WITH its compiled ops,
# mmdet 3.3.0, the test tools, mmseg 1.2.2, mmpretrain 1.2.0 and mmpose
# 1.3.2 (requirements/codebases.txt, without torchvision) and mmtune itself
# in editable mode.
# Building mmcv takes up to 22 minutes on 2 cores the first time; pip caches
# the wheel, and a second run with nothing changed takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${MMTUNE_VENV:-.venv}
PYTHON=${PYTHON:-python3}
STAMP="$VENV/.mmtune-setup"
# Anything that changes what gets installed invalidates the stamp.
WANT=$(cat requirements/*.txt setup.py tools/setup_env.sh | sha256sum |
    cut -d' ' -f1)

# What a working environment imports (xtcocotools.mask: its binary wheel
# installs and then fails to import).
CHECK='import mmtune, mmcv.ops, mmdet, pkg_resources
import mmseg, mmpretrain, mmpose, xtcocotools.mask'

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] &&
    "$VENV/bin/python" -c "$CHECK" 2>/dev/null; then
    echo "[setup] environment in $VENV is up to date"
    exit 0
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

echo "[setup] installing torch, mmengine, mmdet and the test tools"
"${PIP[@]}" install -q --upgrade pip wheel
"${PIP[@]}" install -q -r requirements/cpu.txt -r requirements/tests.txt

if ! "$VENV/bin/python" -c 'import mmcv.ops' 2>/dev/null; then
    echo "[setup] building mmcv 2.1.0 with ops (up to 22 min the first" \
        "time, then cached by pip)"
    # mmcv 2.1.0's setup.py builds with setuptools<70 (pkg_resources).
    "${PIP[@]}" install -q 'setuptools<70'
    MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-2} "${PIP[@]}" install -q \
        --no-build-isolation mmcv==2.1.0
    # back to the runtime pin (torch wants >=77, mmengine pkg_resources)
    "${PIP[@]}" install -q -r requirements/cpu.txt
fi

echo "[setup] installing mmseg, mmpretrain and mmpose (no torchvision)"
# --no-deps: their requirements name torchvision (CUDA wheels, another
# torch) and chumpy (does not build); every package they import is listed.
# xtcocotools is built from source (--no-binary in the file), with cython.
"${PIP[@]}" install -q cython==3.3.1
"${PIP[@]}" install -q --no-deps --no-build-isolation \
    -r requirements/codebases.txt
if ! "$VENV/bin/python" -c 'import xtcocotools.mask' 2>/dev/null; then
    # a binary wheel installed earlier satisfies the pin and fails to import
    "${PIP[@]}" install -q --no-deps --no-build-isolation \
        --force-reinstall --no-binary xtcocotools \
        "$(grep '^xtcocotools==' requirements/codebases.txt | cut -d' ' -f1)"
fi

echo "[setup] installing mmtune in editable mode"
"${PIP[@]}" install -q --no-deps --no-build-isolation -e .

"$VENV/bin/python" -c "$CHECK
print('[setup] ok: mmtune', mmtune.__version__)"
echo "$WANT" >"$STAMP"
