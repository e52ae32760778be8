#!/usr/bin/env bash
# One chunk of gain-hyperprior training on a lent GPU machine, sized to fit one lease.
#
# Run on the device machine from the repository root, with these git-ignored folders carried:
#   .whl    compressai 1.2.8 for CPython 3.12 and pytorch-msssim, which compressai imports (the
#           GPU image has torch, torchvision, scipy, einops and safetensors already):
#             python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#               --implementation cp --platform manylinux_2_34_x86_64 -d .whl compressai==1.2.8
#             python3 -m pip download --no-deps --only-binary=:all: -d .whl pytorch-msssim==1.0.0
#   .train  training photos (never Kodak). The working tree travels with at most 64 MiB and the
#           shipped weights take 21 MB of it, so carry about 40 MB of one pack, e.g.
#             mkdir .train && ls ../shared/data/train-b/* | head -900 | xargs cp -t .train
#           (the 2026-11-27 chunk used `train`; use `train-b` next for new photos).
# Environment: MINUTES (training time, default 8), BATCH (32), LR (3e-4; 1e-4 suits a
# continuation), FRESH=1 to start a new model instead of continuing from the shipped
# codecs/weights/gain-hyperprior.safetensors (done automatically when the shipped weights were
# trained on a CPU: the GPU model is the full-size one), N and M.
# Brings back under $OUT: the weights split into 10 MB parts (a returned file must stay under
# 16 MiB; join them with `cat gain-hyperprior.safetensors.part.* > FILE`, copy it over the
# shipped file and update codecs/weights/gain-hyperprior.md), train_log.csv, train.out, and
# the cross-device check's crossdevice.npz/.json and check.out (cluster/gpu/check_devices.py).
# The checkpoint stays on the machine's disk in /tmp/run: a call within 30 s continues it.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target /tmp/ratefit .
export PYTHONPATH=/tmp/ratefit:/tmp/site PYTHONUNBUFFERED=1
shipped=codecs/weights/gain-hyperprior.safetensors
weights=/tmp/gain-hyperprior.safetensors
init=()
if [ "${FRESH:-0}" != 1 ] && [ -f "$shipped" ]; then
  device=$(python3 -c "from ratefit.codecs.weights import read_weights; print(read_weights('$shipped')[3].get('train_device', 'cpu'))")
  [ "$device" != cpu ] && init=(--init "$shipped")
fi
python3 -m ratefit.jobs.train --data .train --out /tmp/run "${init[@]}" --N "${N:-128}" --M "${M:-192}" \
  --steps 10000000 --max-minutes "${MINUTES:-8}" --batch-size "${BATCH:-32}" --crop 256 --lr "${LR:-3e-4}" \
  --log-every 500 --ckpt-every 2000 --export "$weights" 2>&1 | tee "$OUT/train.out"
cp /tmp/run/train_log.csv "$OUT/"
sha256sum "$weights"
split -b 10M "$weights" "$OUT/gain-hyperprior.safetensors.part."
# Cross-device decode check and GPU stage timings with the weights just trained; verify the
# payloads again here with: python cluster/gpu/check_devices.py --weights W --verify crossdevice.npz
timeout "${CHECK_SECONDS:-90}" python3 cluster/gpu/check_devices.py --weights "$weights" \
  --images .train --out "$OUT" 2>&1 | tee "$OUT/check.out" || echo "device check failed or timed out"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv || true
