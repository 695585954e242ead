#!/usr/bin/env bash
# The README's main-job command: set up (if needed), generate the built-in
# demo dataset, then train and validate the demo Faster R-CNN R18-FPN
# detector (BN frozen, norm_eval=True) with tune mode on. The log shows
# mmtune's report of converted pairs and mmdet's COCO metrics.
# Extra arguments go to tools/train.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
VENV=${MMTUNE_VENV:-.venv}
exec "$VENV/bin/python" tools/train.py \
    configs/demo/faster-rcnn_r18_fpn_80iter_demo-coco.py \
    --work-dir work_dirs/demo \
    --cfg-options fast_conv_bn_eval=True "$@"
