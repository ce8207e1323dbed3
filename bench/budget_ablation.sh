#!/usr/bin/env bash
# Distillation methods at one equal wall-clock budget (bench/budget_ablation.py), two ways:
#
#   bench/budget_ablation.sh cpu RESULTS     # the demo's data, teacher and store (after make demo), 2 min each
#   bench/budget_ablation.sh gpu RESULTS     # one H100/H200, CamVid, after bench/camvid_ablation.sh has left
#                                            # its teacher and store in /tmp/skd-work (~6 x 45 s + evaluations)
# On a GPU machine prepared with ../shared/device/prepare.sh --camvid --weights:
#   source .device/activate.sh && CAMVID=.device/camvid bench/budget_ablation.sh gpu "$OUT"
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:?usage: bench/budget_ablation.sh cpu|gpu RESULTS}
RESULTS=${2:?usage: bench/budget_ablation.sh cpu|gpu RESULTS}
PY=${PYTHON:-python3}
if [ "$MODE" = cpu ]; then
  exec $PY bench/budget_ablation.py --config configs/demo.yaml --teacher runs/demo/teacher/model.pt \
    --cache runs/demo/synthetic.zarr --student-width 0.125 --budget-minutes "${BUDGET:-2}" --out "$RESULTS"
fi
WORK=${WORK:-/tmp/skd-work}
exec $PY bench/budget_ablation.py --config configs/camvid.yaml --data-root "${CAMVID:-../shared/data/camvid}" \
  --teacher "$WORK/teacher/model.pt" --cache "$WORK/camvid-train.zarr" --budget-minutes "${BUDGET:-0.75}" \
  --out "$RESULTS"
