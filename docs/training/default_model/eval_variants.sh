#!/usr/bin/env bash
# `pixal3d eval` of model variants side by side on the device (`run` from the repo root, OUT set by the device tool;
# the export wheels carried in .whl/export). Each variant: held-out objects 0-31 in 8 processes of 4 objects
# (--first 4k --objects 4 --views 1, the shipped default options), variant i on GPU i mod the GPU count.
#   VARIANTS   "B" = the bundled model; "NAME:WEIGHTS" = the bundled model with the networks of a training stage's
#              weights.safetensors in place of its own (export_default --base --replace), e.g. a variant of
#              ss_variants_x4.sh carried back in; "NAME@ARGS" = the bundled model with more `pixal3d eval` arguments
#              (comma-separated, e.g. "G1@--shape-guidance,1").
# Writes OUT/m.tgz (every object's metrics.json and the logs) and prints each variant's means.
# Call (session 9, nvidia-h200-x4, carry .whl/export .device_carry/ss9):
#   VARIANTS="B S:.device_carry/ss9/S_weights.safetensors GS:.device_carry/ss9/GS_weights.safetensors" bash ...
#   (then SS and SS2 of the second ss_variants_x4.sh command, .device_carry/ss9b/*_weights.safetensors)
#   VARIANTS="G1@--shape-guidance,1 G11@--shape-guidance,1,--ss-guidance,1" bash ...   (nvidia-h200)
set -u
export PYTHONUNBUFFERED=1 PIXAL3D_SPARSE_CONV=torch
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/export/*.whl > /tmp/wheels.log 2>&1
export PYTHONPATH=$PWD/backend:$PWD/kernels:/tmp/site
BUNDLED=backend/pixal3d_backend/default_model
GPUS=$(nvidia-smi -L | wc -l)
i=0; NAMES=()
for variant in ${VARIANTS:-B}; do
  name=${variant%%[:@]*}; NAMES+=($name); model=$BUNDLED; args=""
  if [ "${variant:${#name}:1}" = "@" ]; then
    args=${variant#*@}; args=${args//,/ }
  elif [ "$name" != "$variant" ]; then
    model=/tmp/model_$name
    python -m pixal3d_backend.training.export_default --base $BUNDLED --replace ${variant#*:} --out $model || exit 1
  fi
  for k in 0 1 2 3 4 5 6 7; do
    CUDA_VISIBLE_DEVICES=$((i % GPUS)) OMP_NUM_THREADS=1 timeout 540 python -m pixal3d_backend.cli eval \
      --model $model --first $((4 * k)) --objects 4 --views 1 --device cuda --out /tmp/eval_$name/$k $args \
      > /tmp/eval_${name}_$k.log 2>&1 &
  done
  i=$((i + 1))
done
wait
mkdir -p $OUT/m
for name in "${NAMES[@]}"; do for k in 0 1 2 3 4 5 6 7; do
  cp /tmp/eval_$name/$k/metrics.json $OUT/m/${name}_$k.json 2>/dev/null || echo "$name part $k: no metrics"; done; done
cat /tmp/eval_*_?.log > $OUT/m/all.log; tar -czf $OUT/m.tgz -C $OUT m && rm -r $OUT/m
NAMES="${NAMES[*]}" python - <<'PY'
import glob, json, os
keys = ("iou", "psnr", "ssim", "chamfer_visible", "f@0.05_visible", "chamfer_full", "f@0.05_full", "depth_scale")
for name in os.environ["NAMES"].split():
    objs = [o for f in sorted(glob.glob(f"/tmp/eval_{name}/*/metrics.json")) for o in json.load(open(f))["objects"]
            if "iou" in o]
    print(name, len(objs), " ".join(f"{k} {sum(o[k] for o in objs) / max(len(objs), 1):.4f}" for k in keys))
PY
