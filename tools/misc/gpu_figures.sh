#!/usr/bin/env bash
# Every GPU figure that docs/benchmark.md quotes, in three parts that each
# fit one 10-minute device call (on one H200 at af8cfb3 the workloads of
# the three parts took 252, 411 and 443 s; part 1 adds the tools, the host
# breakdown alone about 75 s):
#
#   bash tools/misc/gpu_figures.sh 1 OUT  # host breakdown, launch counts,
#                                         # CUDA check, fold-group tests,
#                                         # 3 workloads
#   bash tools/misc/gpu_figures.sh 2 OUT  # 4 workloads
#   bash tools/misc/gpu_figures.sh 3 OUT  # 4 workloads
#
# then, here, join the parts' tables:
#   python tools/analysis_tools/benchmark_workloads.py --merge \
#       P1/wl/workloads.json P2/wl/workloads.json P3/wl/workloads.json \
#       --out-dir docs/results/<card>_workloads
#
# On the GPU machine without mmengine/mmcv/mmdet, set WHEELS to a folder
# of wheels (mmcv with CUDA ops, mmengine, mmdet, their missing
# dependencies and, for part 1, pytest): they are installed first.
set -uo pipefail
cd "$(dirname "$0")/../.."
PART=${1:?usage: gpu_figures.sh 1|2|3 OUT_DIR}
OUT=${2:?usage: gpu_figures.sh 1|2|3 OUT_DIR}
mkdir -p "$OUT"
if [ -n "${WHEELS:-}" ]; then
    python3 -m pip install -q --no-deps --no-index "$WHEELS"/*.whl
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c 'import torch, mmcv, mmdet, mmengine; print("torch", torch.__version__, "cuda", torch.version.cuda, "mmcv", mmcv.__version__, "mmdet", mmdet.__version__, "mmengine", mmengine.__version__)'
START=$SECONDS
step() { echo "== $1: $((SECONDS - START)) s"; }
WORKLOADS=(python3 tools/analysis_tools/benchmark_workloads.py --repeats 3
    --steps 10 --warmup 3 --timeout 200 --out-dir "$OUT/wl" --only)
case "$PART" in
1)
    python3 tools/analysis_tools/benchmark_host_overhead.py --steps 150 \
        --device cuda --breakdown 2>&1 | tee "$OUT/host_overhead.md"
    step host
    python3 tools/analysis_tools/count_host_launches.py --device cuda \
        2>&1 | tee "$OUT/launches_per_step.txt"
    step launches
    python3 tools/analysis_tools/check_fast_conv_bn_eval.py \
        configs/benchmark/faster-rcnn_r50_fpn_finetune_coco.py \
        --device cuda --img-size 256 320 --batch on \
        2>&1 | tee "$OUT/check_frcnn_cuda.txt"
    step check
    python3 -m pytest tests/test_ops/test_fold_group.py -q \
        -p no:cacheprovider 2>&1 | tee "$OUT/fold_group_tests_cuda.txt"
    step tests
    "${WORKLOADS[@]}" frcnn_r50_b2 frcnn_r50_b8 retina_r50_b2
    ;;
2)
    "${WORKLOADS[@]}" mask_r50_b2 frcnn_r101_b2 frcnn_x101_b2 \
        frcnn_regnetx_b2
    ;;
3)
    "${WORKLOADS[@]}" frcnn_hrnet_b2 mask_r101_b16_fp16 rn50_cls_b64_fp32 \
        rn50_cls_b64_bf16
    ;;
*)
    echo "unknown part $PART (expected 1, 2 or 3)" >&2
    exit 2
    ;;
esac
step "part $PART"
