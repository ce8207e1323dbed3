#!/usr/bin/env bash
# Feature distillation from projected stores (the k table of docs/RESULTS.md §5) on one GPU, in one
# call (~8 min on one H100/H200): the CamVid teacher as bench/ablation.py's gpu scale trains it
# (skipped when WORK already holds one, e.g. after bench/camvid_ablation.sh), then
# bench/fd_projection.py --scale gpu: a baseline, online fd, and fd from stores of k = 16, 32, 64
# PCA channels and of the full features.
#
# On a GPU machine prepared with ../shared/device/prepare.sh --camvid --weights:
#   source .device/activate.sh && CAMVID=.device/camvid WEIGHTS=$(ls .device/weights/*.pth) \
#     bench/fd_gpu.sh "$OUT" /tmp/skd-work
#
# Results: RESULTS/results.json, RESULTS/summary.md, RESULTS/log.txt (rewritten as each step ends).
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:?usage: bench/fd_gpu.sh RESULTS [WORK]}
WORK=${2:-/tmp/skd-work}
PY=${PYTHON:-python3}
CAMVID=${CAMVID:-../shared/data/camvid}
WEIGHTS=${WEIGHTS:-../shared/weights/mobilenet_v2_imagenet_tflite_int8_dequant_bnrecal_camvid-c2b858cd.pth}
mkdir -p "$RESULTS" "$WORK"
if [ ! -f "$WORK/teacher/model.pt" ]; then
  timeout 150 $PY -m cli --quiet train-teacher --config configs/camvid.yaml --data-root "$CAMVID" --crop-size 360x480 \
    --batch-size 8 --workers 4 --device auto --model pspnet_mobilenetv2 --pretrained-backbone "$WEIGHTS" \
    --iterations 1000 --seed 0 --out "$WORK/teacher" >> "$RESULTS/log.txt" 2>&1
fi
exec timeout "${LIMIT:-420}" $PY bench/fd_projection.py --scale "${SCALE:-gpu}" --teacher "$WORK/teacher/model.pt" \
  --data "$CAMVID" --ks "${KS:-16,32,64,full}" --out "$RESULTS" --work "$WORK/fd"
