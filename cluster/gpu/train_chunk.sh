#!/usr/bin/env bash
# One chunk of gain-hyperprior training on a lent GPU machine, sized to fit one lease (one call,
# under 10 minutes): a throughput probe (~40 s), then training that continues the run from the
# shipped weights on its learning-rate schedule, export of the EMA weights, a cross-device check.
# docs/training.md explains the schedule, the totals in the weights' metadata and the packs.
#
# Run on the device machine from the repository root, with these git-ignored folders carried:
#   .whl    compressai 1.2.8 for CPython 3.12 and pytorch-msssim, which compressai imports (the
#           GPU image has torch, torchvision, scipy, einops and safetensors already):
#             python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#               --implementation cp --platform manylinux_2_34_x86_64 -d .whl compressai==1.2.8
#             python3 -m pip download --no-deps --only-binary=:all: -d .whl pytorch-msssim==1.0.0
#   .train/PACK  photos of ONE training pack (never Kodak) in a folder named after the pack: the
#           folder's name is what the weights record as seen. Use the pack the shipped weights have
#           not seen yet (else not the last one): `ratefit train --next-pack WEIGHTS` prints it (after
#           the first chunk's `train`, it is `train-b`). Everything that travels (tracked files with
#           the 21 MB weights, .whl, .train) must stay under 64 MiB, so take as many photos as fit
#           in 60 MiB (about 800-900):
#             PACK=$(.venv/bin/python -m ratefit.jobs.tools.train --next-pack codecs/weights/gain-hyperprior.safetensors)
#             rm -rf .train && mkdir -p .train/$PACK
#             budget=$(( 60 * 1048576 - $(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) - $(du -sb .whl | cut -f1) ))
#             find ../shared/data/$PACK -name '*.jpg' -print0 | sort -z | while IFS= read -r -d '' f; do
#               budget=$(( budget - $(stat -c%s "$f") )); [ "$budget" -gt 0 ] || break; cp "$f" .train/$PACK/; done
# The call: run(command="bash cluster/gpu/train_chunk.sh", carry=[".whl", ".train"], timeout_s=600).
# Environment: MINUTES (training time, default 6.5: with the probe, install, export and check the
# call takes about 8.5 min), BATCH (64; the schedule's lr is for 64 and scales by sqrt(batch/64)),
# PROBE_SECONDS (timed seconds per probe path, default 8; 0 skips the probe: MINUTES=7 then fits),
# EXTRA (more `ratefit train` flags, e.g. "--lambda-min 0.0003" to add two rate levels below the
# lowest, or "--path reference" should the fast path fail), FRESH=1 to start a new model instead
# of continuing from the shipped codecs/weights/gain-hyperprior.safetensors (done automatically
# when the shipped weights were trained on a CPU: the GPU model is the full-size one), N and M.
# Brings back under $OUT (8 files, the most a call returns): the weights split into two 12 MiB
# parts (a returned file must stay under 16 MiB; join them with `cat gain-hyperprior.safetensors.part.*
# > FILE`, copy it over the shipped file and update codecs/weights/gain-hyperprior.md from its
# metadata), throughput.json (the probe), train.out (probe table and training output),
# train_log.csv, and the cross-device check's crossdevice.npz/.json and check.out
# (cluster/gpu/check_devices.py).
# The checkpoint stays on the machine's disk in /tmp/run: a call within 30 s continues it.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target /tmp/ratefit .
export PYTHONPATH=/tmp/ratefit:/tmp/site PYTHONUNBUFFERED=1
shipped=codecs/weights/gain-hyperprior.safetensors
weights=/tmp/gain-hyperprior.safetensors
data=(); for d in .train/*/; do data+=(--data "${d%/}"); done
if [ ${#data[@]} -eq 0 ]; then
  echo "no pack folder under .train (expected .train/PACK/*.jpg, see this script's header)" >&2; exit 2
fi
init=()
if [ "${FRESH:-0}" != 1 ] && [ -f "$shipped" ]; then
  device=$(python3 -c "from ratefit.workers.codec_loader import read_weights; print(read_weights('$shipped')[3].get('train_device', 'cpu'))")
  [ "$device" != cpu ] && init=(--init "$shipped")
  want=$(python3 -m ratefit.jobs.tools.train --next-pack "$shipped")
  [ -d ".train/$want" ] || echo "warning: the shipped weights' next pack is $want, .train has $(ls .train)" >&2
fi
if [ "${PROBE_SECONDS:-8}" != 0 ]; then
  timeout 120 python3 -m ratefit.jobs.tools.train --throughput-probe "${data[@]}" --out "$OUT" --N "${N:-128}" \
    --M "${M:-192}" --batch-size "${BATCH:-64}" --crop 256 --probe-seconds "${PROBE_SECONDS:-8}" 2>&1 \
    | tee "$OUT/train.out" || echo "throughput probe failed or timed out; training anyway" | tee -a "$OUT/train.out"
fi
# shellcheck disable=SC2086  # EXTRA is a list of flags
python3 -m ratefit.jobs.tools.train "${data[@]}" --out /tmp/run "${init[@]}" --N "${N:-128}" --M "${M:-192}" \
  --steps 10000000 --max-minutes "${MINUTES:-6.5}" --batch-size "${BATCH:-64}" --crop 256 \
  --log-every 1000 --ckpt-every 5000 --export "$weights" ${EXTRA:-} 2>&1 | tee -a "$OUT/train.out"
cp /tmp/run/train_log.csv "$OUT/"
sha256sum "$weights"
split -b 12M "$weights" "$OUT/gain-hyperprior.safetensors.part."
# Cross-device decode check and GPU stage timings with the weights just trained; verify the
# payloads again here with: python cluster/gpu/check_devices.py --weights W --verify crossdevice.npz
timeout "${CHECK_SECONDS:-60}" python3 cluster/gpu/check_devices.py --weights "$weights" \
  --images .train --out "$OUT" 2>&1 | tee "$OUT/check.out" || echo "device check failed or timed out"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv || true
