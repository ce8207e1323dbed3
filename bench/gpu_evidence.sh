#!/usr/bin/env bash
# The evidence behind skd's claims, in one GPU call of at most 9 minutes on one H100, on a bare machine:
#   1. step time at Cityscapes scale (bench/step_time.py): R18 x1.0 student, 512x512 crops of 1024x2048
#      images, batch 8, bf16 student, R101 teacher: the student alone, cached pi, cached pi,pa,ho and
#      online pi,pa,ho, their steps taken in turn; the student's median step in ms and each ratio;
#   2. cache-teacher images/s against the teacher alone (R101) on the real CamVid train images, read
#      and decoded from disk (bench/cache_throughput.py --dataset camvid);
#   3. CamVid (bench/ablation.py --mode grid): the teacher (PSPNet-MobileNetV2 from the ImageNet
#      backbone) trained once, cached once with the recommended store (flip, windows of the training
#      crop, levels 1 and 2, a bank of 8 training views), then students seed by seed - baseline, +PI+PA+HO
#      from the cache, +PI from the cache, +PI+PA+HO online - three at a time, as many seeds as fit
#      before the deadline (a student that would not finish in time is not started), each evaluated
#      on CamVid val in the driver's process as soon as it is trained;
#   4. after every step: RESULTS/evidence.md and evidence.json (bench/evidence_summary.py): mIoU per
#      row with mean +- std over seeds, paired differences (distilled minus the baseline of the same
#      seed) with their mean +- std, the step-time and throughput tables, every step's exit and seconds.
#
#   bench/gpu_evidence.sh RESULTS
# On a GPU machine prepared with ../shared/device/prepare.sh --camvid --weights (carry .device):
#   source .device/activate.sh && timeout 560 bench/gpu_evidence.sh "$OUT"
# CamVid and the weights are read from .device/ there (../shared/... where .device/ has none of them).
#
# Time plan on one H100 (rates of ../shared/DESIGN.md section 7 and docs/RESULTS.md section 4,
# measured on an H200; these steps are bound by kernel launches and the loaders, so an H100 is taken
# to be about as fast):
#     ~45 s  machine start (device time, before the command)      ~15 s  source .device/activate.sh
#     ~65 s  step time: a random R101 cached on 64 synthetic 1024x2048 scenes, 4 modes x 13 steps
#            (about 420 scenes drawn by 16 loader workers), limit 130 s
#     ~30 s  cache throughput: R101 on the 367 CamVid train images, teacher alone and cache-teacher,
#            best of 2 each, limit 75 s
#     ~60 s  CamVid teacher, 1000 iterations (46 ms/it)
#     ~40 s  its store (38 s measured for the same settings); the teacher is evaluated meanwhile
#    ~260 s  12 students (3 seeds x 4 rows) of 600 iterations, three at a time: about 63 s each
#            (10 s start, 600 x ~89 ms, the per-iteration rate of three students at a time), 12 / 3 x 63 s;
#            the in-process evaluations (~5 s each) run beside them
#   => ~470 s of the script's BUDGET (520 s): the deadline lets a 4th seed start only where it fits and
#      keeps the script inside 9 minutes if the rates are slower; with `timeout 560` outside, a run cut
#      off still writes its summary (the TERM handler) and returns what finished.
#   STUDENT_ITERS=1000 (the schedule of RESULTS section 4) fits 2 seeds of the 4 rows in the same time.
#
# Settings (environment; GPU defaults): DEVICE=cuda PYTHON=python3 BUDGET=520 (seconds for the script)
#   SIZE=1024x2048 CROP=512x512 TEACHER=pspnet_resnet101 WIDTH=1 ST_BATCH=8 ST_WARMUP=3 ST_ITERS=10 ST_WORKERS=4
#   TP_IMAGES=0 (all) TP_BATCH=8 TP_WORKERS=12 TP_REPEATS=2 TP_PRECISION=fp32
#   CAMVID WEIGHTS SUBSET=0 VAL_SUBSET=$SUBSET (the first N images of each split, linked into WORK)
#   TEACHER_ITERS=1000 STUDENT_ITERS=600 CAMVID_CROP=360x480 BATCH=8 STUDENT_WIDTH=1.0 CAMVID_WORKERS=4
#   PARALLEL=3 VIEWS=8 LEVELS=1,2 WINDOW=360x480 FLIP=true SEEDS=0,1,2,3
#   ROWS=baseline,pi_pa_ho,pi,pi_pa_ho_online T_STEP_TIME=130 T_THROUGHPUT=75 WORK=(a new temporary folder)
# A CPU smoke run of the whole script (numbers meaningless; see docs/BENCHMARKS.md for its time):
#   DEVICE=cpu PYTHON=.venv/bin/python BUDGET=900 SIZE=128x192 CROP=128x128 TEACHER=pspnet_resnet18 WIDTH=0.25 \
#     ST_BATCH=2 ST_WARMUP=1 ST_ITERS=2 ST_WORKERS=0 TP_BATCH=4 TP_WORKERS=1 TP_REPEATS=1 SUBSET=8 VAL_SUBSET=4 \
#     TEACHER_ITERS=2 STUDENT_ITERS=2 CAMVID_CROP=128x160 BATCH=2 STUDENT_WIDTH=0.125 CAMVID_WORKERS=0 PARALLEL=2 \
#     VIEWS=2 LEVELS=1 FLIP=false SEEDS=0,1 nice -n 10 bench/gpu_evidence.sh /tmp/evidence-smoke
#
# Results (seven files; a call returns at most eight: write nothing else under RESULTS): log.txt (every
# step's output and exit), results.json and summary.md (bench/ablation.py, rewritten as each CamVid step
# ends), step_time.json, cache_throughput.json, evidence.json, evidence.md. No checkpoints or stores:
# they stay in WORK.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:?usage: bench/gpu_evidence.sh RESULTS}
mkdir -p "$RESULTS"
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda} BUDGET=${BUDGET:-520}
SIZE=${SIZE:-1024x2048} CROP=${CROP:-512x512} TEACHER=${TEACHER:-pspnet_resnet101} WIDTH=${WIDTH:-1}
ST_BATCH=${ST_BATCH:-8} ST_WARMUP=${ST_WARMUP:-3} ST_ITERS=${ST_ITERS:-10} ST_WORKERS=${ST_WORKERS:-4}
TP_IMAGES=${TP_IMAGES:-0} TP_BATCH=${TP_BATCH:-8} TP_WORKERS=${TP_WORKERS:-12} TP_REPEATS=${TP_REPEATS:-2}
TP_PRECISION=${TP_PRECISION:-fp32}
TEACHER_ITERS=${TEACHER_ITERS:-1000} STUDENT_ITERS=${STUDENT_ITERS:-600} CAMVID_CROP=${CAMVID_CROP:-360x480}
BATCH=${BATCH:-8} STUDENT_WIDTH=${STUDENT_WIDTH:-1.0} CAMVID_WORKERS=${CAMVID_WORKERS:-4} PARALLEL=${PARALLEL:-3}
VIEWS=${VIEWS:-8} LEVELS=${LEVELS:-1,2} WINDOW=${WINDOW:-360x480} FLIP=${FLIP:-true} SEEDS=${SEEDS:-0,1,2,3}
ROWS=${ROWS:-baseline,pi_pa_ho,pi,pi_pa_ho_online}
T_STEP_TIME=${T_STEP_TIME:-130} T_THROUGHPUT=${T_THROUGHPUT:-75}
SUBSET=${SUBSET:-0} VAL_SUBSET=${VAL_SUBSET:-$SUBSET}
if [ -z "${CAMVID:-}" ]; then
  if [ -d .device/camvid ]; then CAMVID=.device/camvid; else CAMVID=../shared/data/camvid; fi
fi
if [ -z "${WEIGHTS:-}" ]; then
  WEIGHTS=$(ls .device/weights/*.pth 2>/dev/null | head -n 1)
  WEIGHTS=${WEIGHTS:-../shared/weights/mobilenet_v2_imagenet_tflite_int8_dequant_bnrecal_camvid-c2b858cd.pth}
fi
OWN_WORK=
if [ -z "${WORK:-}" ]; then WORK=$(mktemp -d); OWN_WORK=1; fi
mkdir -p "$WORK"
LOG=$RESULTS/log.txt STATUS=$WORK/status.tsv
: > "$STATUS"

summarise() {
  timeout 30 $PY bench/evidence_summary.py "$RESULTS" --status "$STATUS" >> "$LOG" 2>&1
}
CHILD=
on_signal() {  # cut off from outside: stop the running step, then summarise what finished
  trap - TERM INT
  if [ -n "$CHILD" ]; then kill -TERM "$CHILD" 2>/dev/null; wait "$CHILD" 2>/dev/null; fi
  echo "cut off after $SECONDS s (checkpoints and stores left in $WORK)" | tee -a "$LOG"
  summarise
  exit 143
}
trap on_signal TERM INT
step() {  # step NAME SECONDS COMMAND...: run under a time limit (in the background, so that a signal
  local name=$1 limit=$2 start=$SECONDS rc  # reaches the handler at once), log its output and exit
  shift 2
  echo "=== $name (limit $limit s, at $SECONDS s): $*" >> "$LOG"
  timeout "$limit" "$@" >> "$LOG" 2>&1 &
  CHILD=$!
  wait "$CHILD"
  rc=$?
  CHILD=
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" $((SECONDS - start)) "$limit" >> "$STATUS"
  echo "$name: exit $rc after $((SECONDS - start)) s (limit $limit s)" | tee -a "$LOG"
  summarise
}

{
  echo "gpu_evidence.sh $(git rev-parse --short HEAD 2>/dev/null) $(date -u +%FT%TZ) on $(hostname)"
  command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  echo "DEVICE=$DEVICE BUDGET=$BUDGET SIZE=$SIZE CROP=$CROP TEACHER=$TEACHER WIDTH=$WIDTH ST_BATCH=$ST_BATCH" \
    "ST_WARMUP=$ST_WARMUP ST_ITERS=$ST_ITERS ST_WORKERS=$ST_WORKERS TP_IMAGES=$TP_IMAGES TP_BATCH=$TP_BATCH" \
    "TP_WORKERS=$TP_WORKERS TP_REPEATS=$TP_REPEATS TP_PRECISION=$TP_PRECISION CAMVID=$CAMVID WEIGHTS=$WEIGHTS" \
    "SUBSET=$SUBSET VAL_SUBSET=$VAL_SUBSET TEACHER_ITERS=$TEACHER_ITERS STUDENT_ITERS=$STUDENT_ITERS" \
    "CAMVID_CROP=$CAMVID_CROP BATCH=$BATCH STUDENT_WIDTH=$STUDENT_WIDTH CAMVID_WORKERS=$CAMVID_WORKERS" \
    "PARALLEL=$PARALLEL VIEWS=$VIEWS LEVELS=$LEVELS WINDOW=$WINDOW FLIP=$FLIP SEEDS=$SEEDS ROWS=$ROWS WORK=$WORK"
} >> "$LOG" 2>&1

# A subset of CamVid (smoke runs): the first SUBSET train and VAL_SUBSET val images, linked.
if [ "$SUBSET" -gt 0 ]; then
  subset=$WORK/camvid-subset
  for split in train val; do
    n=$SUBSET; [ "$split" = val ] && n=$VAL_SUBSET
    mkdir -p "$subset/$split" "$subset/${split}annot"
    for image in $(ls "$CAMVID/$split" | sort | head -n "$n"); do
      ln -sf "$(realpath "$CAMVID/$split/$image")" "$subset/$split/$image"
      ln -sf "$(realpath "$CAMVID/${split}annot/${image%.*}.png")" "$subset/${split}annot/${image%.*}.png"
    done
  done
  CAMVID=$subset
fi

# 1. Step time at Cityscapes scale: student alone, cached pi, cached pi,pa,ho, online pi,pa,ho.
step step_time "$T_STEP_TIME" $PY bench/step_time.py --size "$SIZE" --crop "$CROP" --batch-size "$ST_BATCH" \
  --student-width "$WIDTH" --teacher-arch "$TEACHER" --teacher-width "$WIDTH" --workers "$ST_WORKERS" \
  --device "$DEVICE" --warmup "$ST_WARMUP" --iterations "$ST_ITERS" --losses pi --losses pi,pa,ho \
  --online-losses pi,pa,ho --output "$RESULTS/step_time.json"

# 2. Cache writing on real CamVid images: the teacher alone against cache-teacher.
step cache_throughput "$T_THROUGHPUT" $PY bench/cache_throughput.py --dataset camvid --data-root "$CAMVID" \
  --images "$TP_IMAGES" --teacher-arch "$TEACHER" --teacher-width "$WIDTH" --batch-size "$TP_BATCH" \
  --workers "$TP_WORKERS" --repeats "$TP_REPEATS" --device "$DEVICE" --precision "$TP_PRECISION" \
  --output "$RESULTS/cache_throughput.json"

# 3. CamVid: teacher, store, students seed by seed until the deadline (20 s kept for the last
#    evaluation and the summary).
deadline=$((BUDGET - SECONDS - 20))
if [ "$deadline" -lt 60 ]; then deadline=60; fi
flip_flag=$([ "$FLIP" = true ] && echo true || echo false)
step camvid $((deadline + 15)) $PY bench/ablation.py --scale gpu --mode grid --rows "$ROWS" --seeds "$SEEDS" \
  --out "$RESULTS" --work "$WORK/camvid" --data "$CAMVID" --weights "$WEIGHTS" --deadline "$deadline" \
  --evaluate-in-process --parallel "$PARALLEL" --set device="$DEVICE" --set teacher_iterations="$TEACHER_ITERS" \
  --set student_iterations="$STUDENT_ITERS" --set crop="$CAMVID_CROP" --set batch_size="$BATCH" \
  --set student_width="$STUDENT_WIDTH" --set workers="$CAMVID_WORKERS" --set teacher_window="$WINDOW" \
  --set levels="$LEVELS" --set views="$VIEWS" --set teacher_flip="$flip_flag"

echo "done after $SECONDS s" | tee -a "$LOG"
summarise
[ -n "$OWN_WORK" ] && [ -z "${KEEP_WORK:-}" ] && rm -rf "$WORK"
cat "$RESULTS/evidence.md"
