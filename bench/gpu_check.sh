#!/usr/bin/env bash
# One GPU call (steps 1-3 took 4.4 minutes on an H200 when last run; steps 4-5 add 1-5 minutes)
# for what only a GPU can show:
#   1. torchrun --nproc_per_node 1: the NCCL process group, the DDP student and the rank logic of
#      cache-teacher start and finish (train-teacher, cache-teacher, train-student pi,pa,ho);
#   2. step time at Cityscapes scale (R18 x1.0 student, 512x512 crops of 1024x2048 images, batch 8,
#      bf16 student, R101 teacher): student only vs cached vs online pi,pa,ho (LOSSES="pi pi,pa pi,pa,ho"
#      for all three loss sets, ~2 more minutes), and a profiler table;
#   3. cache-writing throughput at 1024x2048, teacher alone vs cache-teacher, fp32 and bf16;
#   4. the discriminator's step alone on 64x64 maps (the 512x512 crops' output): its time in fp32
#      and bf16, and how far bf16 moves its gradients;
#   5. the student compiled (train.compile), student-only and cached pi,pa,ho, each eager and
#      compiled in turn (the first warm-up steps compile; last, so that a slow compile costs nothing else).
#
#   bench/gpu_check.sh RESULTS
# On a GPU machine prepared with ../shared/device/prepare.sh:
#   source .device/activate.sh && timeout 560 bench/gpu_check.sh "$OUT"
# (each step has its own limit, and what the steps wrote before a timeout stays)
# A CPU dry run of the same script (about three minutes on 2 cores, numbers meaningless; crops of at least
# 128x128, as pair-wise nodes need more than one stored feature cell):
#   DEVICE=cpu SIZE=128x192 CROP=128x128 TEACHER=pspnet_resnet18 WIDTH=0.25 LOSSES="pi pi,pa pi,pa,ho" \
#     PYTHON=.venv/bin/python bench/gpu_check.sh /tmp/check
# Results (eight files, the most one call returns: write nothing else under RESULTS): status.log
# (each step's exit code and seconds), log.txt (every step's output), step_time_gpu.json,
# step_profile_gpu.txt, cache_throughput_{fp32,bf16}.json, discriminator_step_gpu.json,
# step_time_compiled_gpu.json
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:?usage: bench/gpu_check.sh RESULTS}
mkdir -p "$RESULTS"
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda} SIZE=${SIZE:-1024x2048} CROP=${CROP:-512x512} TEACHER=${TEACHER:-pspnet_resnet101} WIDTH=${WIDTH:-1}
LOSS_ARGS=()
for set in ${LOSSES:-pi,pa,ho}; do LOSS_ARGS+=(--losses "$set"); done
WORK=$(mktemp -d)
step() {  # step NAME SECONDS COMMAND...: run under a time limit, log its output and status
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  echo "=== $name: $*" >> "$RESULTS/log.txt"
  timeout "$limit" "$@" >> "$RESULTS/log.txt" 2>&1
  echo "$name: exit $? after $((SECONDS - start)) s" | tee -a "$RESULTS/log.txt" >> "$RESULTS/status.log"
}
TORCHRUN=($PY -m torch.distributed.run --nproc_per_node 1 -m cli -q)
step torchrun_teacher 90 "${TORCHRUN[@]}" train-teacher --dataset synthetic --width 0.25 --iterations 20 --batch-size 4 \
  --device "$DEVICE" --out "$WORK/teacher"
step torchrun_cache 90 "${TORCHRUN[@]}" cache-teacher --dataset synthetic --teacher "$WORK/teacher/model.pt" \
  --feature-pool 1 --device "$DEVICE" --cache "$WORK/synthetic.zarr"
step torchrun_student 90 "${TORCHRUN[@]}" train-student --dataset synthetic --cache "$WORK/synthetic.zarr" --losses pi,pa,ho \
  --width 0.25 --iterations 20 --batch-size 4 --device "$DEVICE" --out "$WORK/student"
# The modes (student-only, cached, online per loss set) train side by side, taking steps in turn,
# each with its own loader: 4 workers each keep the 16 cores from being oversubscribed.
step step_time 150 $PY bench/step_time.py --size "$SIZE" --crop "$CROP" --student-width "$WIDTH" --teacher-arch "$TEACHER" \
  --teacher-width "$WIDTH" --workers 4 --device "$DEVICE" --warmup 3 --iterations 12 "${LOSS_ARGS[@]}" \
  --profile "$RESULTS/step_profile_gpu.txt" --output "$RESULTS/step_time_gpu.json"
for precision in fp32 bf16; do
  step "cache_throughput_$precision" 60 $PY bench/cache_throughput.py --size "$SIZE" --teacher-arch "$TEACHER" \
    --teacher-width "$WIDTH" --images 32 --repeats 1 --batch-size 4 --workers 12 --device "$DEVICE" \
    --precision $precision --output "$RESULTS/cache_throughput_$precision.json"
done
MAPS=$(( ${CROP%x*} / 8 ))
step discriminator_step 60 $PY bench/discriminator_step.py --maps "$MAPS" --device "$DEVICE" \
  --output "$RESULTS/discriminator_step_gpu.json"
step step_time_compiled 240 $PY bench/step_time.py --size "$SIZE" --crop "$CROP" --student-width "$WIDTH" \
  --teacher-arch "$TEACHER" --teacher-width "$WIDTH" --workers 4 --device "$DEVICE" --warmup 2 --iterations 8 \
  --losses pi,pa,ho --no-online --compile --output "$RESULTS/step_time_compiled_gpu.json"
rm -rf "$WORK"
