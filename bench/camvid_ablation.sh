#!/usr/bin/env bash
# The paper's ablation on real CamVid, end to end (see bench/ablation.py for what it runs).
#
#   bench/camvid_ablation.sh RESULTS [WORK]                  # SCALE=gpu (default): one H100/H200, ~8 min
#   SEEDS=0,1 bench/camvid_ablation.sh RESULTS               # + baseline and full method for seed 1
#   MODE=seeds SEEDS=1,2 bench/camvid_ablation.sh RESULTS    # baseline and full method only, seeds 1 and 2
#   SCALE=cpu bench/camvid_ablation.sh RESULTS               # the same at a scale a 2-core CPU finishes
#   SCALE=smoke bench/camvid_ablation.sh RESULTS             # a few minutes: checks the script end to end
#
# On a GPU machine prepared with ../shared/device/prepare.sh --camvid --weights:
#   source .device/activate.sh && CAMVID=.device/camvid WEIGHTS=$(ls .device/weights/*.pth) \
#     bench/camvid_ablation.sh "$OUT" /tmp/skd-work
#
# Results: RESULTS/results.json, RESULTS/summary.md, RESULTS/log.txt (rewritten as each step ends).
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:?usage: bench/camvid_ablation.sh RESULTS [WORK]}
WORK=${2:-}
exec ${PYTHON:-python3} bench/ablation.py --scale "${SCALE:-gpu}" --mode "${MODE:-ablation}" --seeds "${SEEDS:-0}" --out "$RESULTS" \
  ${WORK:+--work "$WORK"} ${CAMVID:+--data "$CAMVID"} ${WEIGHTS:+--weights "$WEIGHTS"}
