#!/usr/bin/env bash
# Step time and cache-writing throughput at Cityscapes scale on one GPU, in one call of <= 9 minutes:
#   step time: R18 x1.0 student, 512x512 crops of 1024x2048 images, batch 8, bf16 student, R101
#     teacher (random init: speed does not depend on the weights), student only vs cached vs online
#     for pi, pi+pa and pi+pa+ho, plus a torch.profiler table of one cached pi+pa+ho step;
#   cache throughput: the R101 teacher alone vs cache-teacher, 1024x2048, batch 4, fp32 and bf16.
#
#   bench/speed_gpu.sh RESULTS
# On a GPU machine prepared with ../shared/device/prepare.sh:
#   source .device/activate.sh && bench/speed_gpu.sh "$OUT"
# Results: RESULTS/step_time_gpu.json, step_profile_gpu.txt, cache_throughput_{fp32,bf16}.json, *.log
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:?usage: bench/speed_gpu.sh RESULTS}
mkdir -p "$RESULTS"
PY=${PYTHON:-python3}
timeout 300 $PY bench/step_time.py --size 1024x2048 --crop 512x512 --student-width 1 --teacher-arch pspnet_resnet101 \
  --teacher-width 1 --workers 8 --device cuda --iterations 30 --losses pi --losses pi,pa --losses pi,pa,ho \
  --profile "$RESULTS/step_profile_gpu.txt" --output "$RESULTS/step_time_gpu.json" > "$RESULTS/step_time.log" 2>&1
echo "step time: exit $?" >> "$RESULTS/status.log"
for precision in fp32 bf16; do
  timeout 100 $PY bench/cache_throughput.py --size 1024x2048 --teacher-arch pspnet_resnet101 --teacher-width 1 \
    --images 48 --batch-size 4 --workers 12 --device cuda --precision $precision \
    --output "$RESULTS/cache_throughput_$precision.json" > "$RESULTS/cache_throughput_$precision.log" 2>&1
  echo "cache throughput $precision: exit $?" >> "$RESULTS/status.log"
done
