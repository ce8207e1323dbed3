#!/usr/bin/env bash
# Every measurement of docs/RESULTS.md §2-3 (the recipe study on the synthetic demo), in one command.
# On the 2-core CPU this takes a few hours; finished runs are skipped on a re-run.
#
#   bench/recipe_sweeps.sh [OUT]        # default runs/recipe
#
# The demo's teacher, three stores of it (whole image; sliding windows; windows + levels, the
# demo's default), replay fidelity against the online teacher, then the sweeps: λ_pi x T from each
# source, pseudo-labels, λ_pa, λ_ho, the KD warm-up. Tables: OUT/*/sweep.md; replay: OUT/replay.json.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/recipe}
PY=${PYTHON:-python3}
skd() { echo "+ skd $*" >&2; $PY -m cli --quiet "$@"; }
mkdir -p "$OUT"
T=$OUT/teacher/model.pt
[ -f "$T" ] || skd train-teacher --config configs/demo.yaml --model pspnet_resnet18 --width 0.5 --seed 0 \
  --iterations 600 --out "$OUT/teacher"
store() {  # store NAME OPTIONS...
  local name=$1; shift
  [ -d "$OUT/$name.zarr" ] || skd cache-teacher --config configs/demo.yaml --teacher "$T" --cache "$OUT/$name.zarr" "$@"
}
store whole --teacher-window whole --levels 1
store windows --levels 1
store windows_levels  # the demo config: 64x64 windows, levels 1, 1.5, flip

[ -f "$OUT/replay.json" ] || $PY bench/replay_fidelity.py --teacher "$T" --dataset synthetic \
  --dataset-options '{"size": [96, 128]}' --split val --crop 64x64 --scales 0.75,1,1.5 --crops 128 --tta-scales 1 \
  --variants plain,tta,window,levels,window+levels,tta+window+levels --window 64x64 --levels 1,1.5 \
  --feature-pool 2 --device cpu --workdir "$OUT/replay" --output "$OUT/replay.json"

sweep() { $PY bench/recipe_sweep.py --teacher "$T" "$@"; }
ALL=(--cache "whole=$OUT/whole.zarr" --cache "windows=$OUT/windows.zarr" --cache "windows_levels=$OUT/windows_levels.zarr")
WL=(--cache "windows_levels=$OUT/windows_levels.zarr")
# λ_pi x T without warm-up (kd_warmup=0), every teacher source
sweep "${ALL[@]}" --online --grid "losses=pi lambda_pi=0.3,1,3,10,30,80 temperature=1,4 kd_warmup=0" --seeds 0,1 --out "$OUT/pi"
sweep "${ALL[@]}" --online --grid "losses=pi lambda_pi=1 temperature=1 kd_warmup=0" --seeds 0,1,2,3 --out "$OUT/pi"
# the teacher's argmax as the only label
sweep "${WL[@]}" --online --grid "losses=none pseudo_labels=true" --seeds 0,1 --out "$OUT/pseudo"
# pair-wise and holistic weights on top of λ_pi = 1
sweep "${WL[@]}" --grid "losses=pi+pa lambda_pi=1 kd_warmup=0 lambda_pa=0.5,5,50" --seeds 0,1,2,3 --out "$OUT/pi"
sweep "${WL[@]}" --grid "losses=pi+pa+ho lambda_pi=1 kd_warmup=0 lambda_pa=0.5 lambda_ho=0.03,0.1,0.3" --seeds 0,1,2,3 --out "$OUT/pi"
# the KD warm-up (a fraction of the iterations)
sweep "${WL[@]}" --grid "losses=pi lambda_pi=1,3,10,30 kd_warmup=0.33" --seeds 0,1,2,3 --out "$OUT/pi"
sweep "${WL[@]}" --grid "losses=pi lambda_pi=10 kd_warmup=0.17,0.5" --seeds 0,1,2,3 --out "$OUT/pi"
sweep "${ALL[@]}" --online --grid "losses=pi lambda_pi=10 kd_warmup=0.33" --seeds 0,1,2,3 --out "$OUT/pi"
# the full method at the defaults, cached vs online, six seeds
sweep "${WL[@]}" --online --grid "losses=pi+pa+ho" --seeds 0,1,2,3,4,5 --out "$OUT/full"
