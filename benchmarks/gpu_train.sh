#!/usr/bin/env bash
# Train a stroke MeshNet from label-map heads on a lent GPU machine, for a fixed time, and
# judge every epoch on the real scans; everything lands under one folder to bring back.
#
#   bash benchmarks/gpu_train.sh OUT [MINUTES] [HEADS] [CHANNELS]
#
# 1. `meshseg synth --label-maps` writes HEADS heads (default 400) of any contrast on every
#    CPU core of the machine (the generator is numpy; about 20 s a head per core);
# 2. `meshseg train --device cuda --amp` trains MeshNet-CHANNELS (default 16) on whole
#    256^3 heads with the paper's recipe, for at most MINUTES (default 8): SIGTERM at the
#    deadline ends it like Ctrl-C, keeping last.pt and every finished epoch's weights;
# 3. benchmarks/real_scans.py scores each kept epoch on ../shared/real-scans (agreement with
#    the ARC-trained model, volumes on the healthy heads and the FLAIR).
# OUT holds heads/, run/, synth.log, train.log and real_scans.md. Needs ../shared beside the
# checkout (label maps, lesion atlas, real scans), as the tests do.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: gpu_train.sh OUT [MINUTES] [HEADS] [CHANNELS]}
minutes=${2:-8}
heads=${3:-400}
channels=${4:-16}
shared=../shared
mkdir -p "$out"

meshseg synth "$out/heads" -n "$heads" --seed 5000 --label-maps "$shared/label-maps" \
  --lesions "$shared/lesion-atlas/soop-lesions" --contrast any --skull-stripped 0.5 \
  -j "$(nproc)" 2>&1 | tee "$out/synth.log"

# exit 124 (timeout's deadline) is the expected end, 143 if the job itself is sent SIGTERM;
# anything else is a failure
status=0
timeout --signal=TERM "${minutes}m" meshseg train --data "$out/heads/manifest.csv" \
  --out "$out/run" --channels "$channels" --device cuda --amp --epochs 50 \
  --steps-per-epoch 100 --keep-epochs --num-workers 8 --cache "$out/cache" \
  2>&1 | tee "$out/train.log" || status=$?
if [ "$status" -ne 0 ] && [ "$status" -ne 143 ] && [ "$status" -ne 124 ]; then
  echo "train failed with exit $status" >&2
  exit "$status"
fi

models=()
for epoch in "$out"/run/epochs/*.safetensors; do
  [ -e "$epoch" ] && models+=(--model "$epoch")
done
if [ ${#models[@]} -eq 0 ]; then
  echo "no epoch finished within $minutes minutes" >&2
  exit 1
fi
python3 benchmarks/real_scans.py "${models[@]}" -o "$out/real_scans.md"
