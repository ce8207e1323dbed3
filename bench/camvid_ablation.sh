#!/usr/bin/env bash
# The paper's ablation on real CamVid (SegNet 11 classes), end to end and deterministic:
#   teacher (ImageNet MobileNetV2 PSPNet) -> cache (train + val, with teacher TTA)
#   -> students: baseline, +PI, +PI+PA, +PI+PA+HO from the cache, +PI+PA+HO with the online teacher
#   -> CamVid val mIoU (single scale, whole image), cache bytes/fidelity, step-time ratios.
# Every finished step is skipped on a re-run and an interrupted training run resumes, so the script
# can be run again after a time limit until it completes.
#
#   bench/camvid_ablation.sh [OUT]            # SCALE=gpu (default): the full experiment
#   SCALE=cpu bench/camvid_ablation.sh [OUT]  # the same at a scale a 2-core CPU finishes
#
# Results: OUT/*.json and OUT/summary.md (written by bench/summarize.py).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-runs/camvid}
SCALE=${SCALE:-gpu}
DATA=${CAMVID:-../shared/data/camvid}
WEIGHTS=${WEIGHTS:-../shared/weights/mobilenet_v2_imagenet_tflite_int8_dequant_bnrecal_camvid-c2b858cd.pth}
PY=${PYTHON:-python}

case "$SCALE" in
  gpu) T_ITERS=3000; S_ITERS=3000; CROP=360x480; BATCH=8; S_WIDTH=1.0; WORKERS=8; DEVICE=auto; BENCH_ITERS=30
       TTA=(--teacher-scales 0.75,1,1.25 --teacher-flip); LAMBDA_PI=80 ;;
  # 2 cores: fewer, smaller steps, flip-only teacher TTA, and the pixel-wise weight that suits a
  # few-hundred-step schedule (see configs/demo.yaml for the measurement behind it).
  cpu) T_ITERS=${T_ITERS:-400}; S_ITERS=${S_ITERS:-300}; CROP=128x160; BATCH=8; S_WIDTH=0.5; WORKERS=1; DEVICE=cpu
       BENCH_ITERS=10; TTA=(--teacher-scales 1 --teacher-flip); LAMBDA_PI=10 ;;
  *) echo "SCALE must be gpu or cpu" >&2; exit 2 ;;
esac

mkdir -p "$OUT"
skd() { echo "+ skd $*" >&2; $PY -m cli --quiet "$@"; }
common=(--config configs/camvid.yaml --data-root "$DATA" --crop-size "$CROP" --batch-size "$BATCH"
        --workers "$WORKERS" --device "$DEVICE" --seed 0)

# train RUN ARGS...: train unless OUT/RUN/model.pt exists; resume when a checkpoint is there.
train() {
  local run=$1 cmd=$2; shift 2
  [ -f "$OUT/$run/model.pt" ] && return 0
  local resume=(); [ -f "$OUT/$run/last.pt" ] && resume=(--resume)
  skd "$cmd" "${common[@]}" --out "$OUT/$run" "${resume[@]}" "$@"
}
evaluate() {
  local run=$1
  [ -f "$OUT/$run.json" ] || skd evaluate --config configs/camvid.yaml --data-root "$DATA" --device "$DEVICE" \
    --checkpoint "$OUT/$run/model.pt" --output "$OUT/$run.json" --name "$run" --save-images 4
}

# 1. teacher: ImageNet MobileNetV2 backbone at output stride 8 with a PSP head
train teacher train-teacher --model pspnet_mobilenetv2 --pretrained-backbone "$WEIGHTS" --iterations "$T_ITERS"
evaluate teacher

# 2. cache it once (train split for distillation, val split to measure the stored maps)
for split in train val; do
  store="$OUT/camvid-$split.zarr"
  [ -d "$store" ] || skd cache-teacher --config configs/camvid.yaml --data-root "$DATA" --device "$DEVICE" --workers "$WORKERS" \
    --teacher "$OUT/teacher/model.pt" --split "$split" --cache "$store" "${TTA[@]}"
done
[ -f "$OUT/teacher-cache.json" ] || skd evaluate --config configs/camvid.yaml --data-root "$DATA" \
  --cache "$OUT/camvid-val.zarr" --output "$OUT/teacher-cache.json" --name "teacher (cached, TTA)"

# 3. students: PSPNet-ResNet-18 from scratch, same schedule, seed, crop and batch
student=(--model pspnet_resnet18 --width "$S_WIDTH" --iterations "$S_ITERS" --lambda-pi "$LAMBDA_PI")
train baseline train-teacher --model pspnet_resnet18 --width "$S_WIDTH" --iterations "$S_ITERS"
train pi train-student "${student[@]}" --cache "$OUT/camvid-train.zarr" --losses pi
train pi_pa train-student "${student[@]}" --cache "$OUT/camvid-train.zarr" --losses pi,pa
train pi_pa_ho train-student "${student[@]}" --cache "$OUT/camvid-train.zarr" --losses pi,pa,ho
train pi_pa_ho_online train-student "${student[@]}" --teacher "$OUT/teacher/model.pt" --losses pi,pa,ho
for run in baseline pi pi_pa pi_pa_ho pi_pa_ho_online; do evaluate "$run"; done

# 4. cost and cache fidelity
# all three terms, then pixel-wise only (the cache's own overhead, without the discriminator's cost)
for losses in pi,pa,ho pi; do
  name=step_time; [ "$losses" = pi ] && name=step_time_pi_only
  [ -f "$OUT/$name.json" ] || $PY bench/step_time.py --dataset camvid --data-root "$DATA" \
    --teacher "$OUT/teacher/model.pt" --cache "$OUT/camvid-train.zarr" --student pspnet_resnet18 \
    --student-width "$S_WIDTH" --crop "$CROP" --batch-size "$BATCH" --workers "$WORKERS" --device "$DEVICE" \
    --iterations "$BENCH_ITERS" --losses "$losses" --output "$OUT/$name.json"
done
[ -f "$OUT/cache_fidelity.json" ] || $PY bench/cache_fidelity.py --cache "$OUT/camvid-val.zarr" \
  --teacher "$OUT/teacher/model.pt" --dataset camvid --data-root "$DATA" --split val --device "$DEVICE" \
  --output "$OUT/cache_fidelity.json"

$PY bench/summarize.py "$OUT" | tee "$OUT/summary.md"
