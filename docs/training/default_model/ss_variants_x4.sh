#!/usr/bin/env bash
# Session 8/9 (4x H200, `run` from the repo root, OUT set by the device tool): the sparse-structure flow alone, four
# variants side by side on one growing pool, each from the bundled model's SS flow, so their validation losses
# (same held-out views, noise and timesteps) say which change to keep. The shape and texture flows are not trained.
#   every GPU: 4 flow_pool processes writing a part every minute (batches from FIRST_BATCH; never used before);
#   first, 4 processes write the validation pool (batches from VAL_BATCH, the same views as grow_x4.sh's);
#   then GPU k trains variant k of VARIANTS ("name:train.py arguments", comma-separated; the name is its output's
#   prefix).
# Needs .device_carry/vae/<stage>/weights.safetensors (the VAE encoders, carried; the SS latents come from ss_vae);
# the bundled model's SS decoder joins the ss_vae weights, so every variant logs the structure term through the
# decoder inference uses (and --structure-loss trains through it).
# Calls:  TOTAL_MIN=8.2 FIRST_BATCH=50000 VARIANTS="A: B:--views-per-step=96 E:--encoder-layers=8
#           BE:--views-per-step=96,--encoder-layers=8" bash docs/training/default_model/ss_variants_x4.sh   (session 8)
#         TOTAL_MIN=8.0 FIRST_BATCH=60000 bash docs/training/default_model/ss_variants_x4.sh   (session 9: defaults)
#         TOTAL_MIN=8.0 FIRST_BATCH=62000 INIT_WEIGHTS=.device_carry/ss9/S_weights.safetensors
#           VARIANTS="S:--structure-loss=0.5 S2:--structure-loss=2 A:" bash ...   (session 9, second command: from S)
# Chained commands (session 10): one training over PHASES back-to-back calls on the same warm machine. STATE is a
# folder that outlives a call there (under the repo's ignored .cache/); PHASE 1 starts every variant from INIT,
# PHASE k > 1 resumes them (train.py --resume, the same arguments) on the pool the earlier phases wrote, grown by 16
# more processes (pool shards 16 (k - 1) + 0..15 of 16 PHASES); the last phase decays the learning rate to a tenth
# and, with EVAL=1, runs eval_variants.sh on every variant's weights (OUT/m.tgz). Every phase returns the weights.
#         STATE=.cache/ss10 PHASES=3 PHASE=1 TOTAL_MIN=8.0 FIRST_BATCH=64000 VARIANTS="R: P:--pe-mode=ape
#           PS:--pe-mode=ape,--structure-loss=0.5 PE:--pe-mode=ape,--encoder-layers=8" bash ...   (session 10; then
#           PHASE=2 TOTAL_MIN=8.4, then PHASE=3 TOTAL_MIN=3.4 EVAL=1 with .whl/export carried too)
set -u
export PYTHONPATH=$PWD/backend:$PWD/kernels PYTHONUNBUFFERED=1 PIXAL3D_SPARSE_CONV=torch
TOTAL_MIN=${TOTAL_MIN:-8.6}; FIRST_BATCH=${FIRST_BATCH:-50000}; VAL_BATCH=${VAL_BATCH:-50000000}
VARIANTS=${VARIANTS:-"A: G:--augment S:--structure-loss=0.5 GS:--augment,--structure-loss=0.5"}
STATE=${STATE:-/tmp}; PHASES=${PHASES:-1}; PHASE=${PHASE:-1}
POOL_SHARD0=$((16 * (PHASE - 1))); POOL_SHARDS=$((16 * PHASES))
INIT=backend/pixal3d_backend/default_model
VAE=$STATE/vae; POOL=$STATE/pool; VAL=$STATE/val; LOG=$OUT/logs.txt
nvidia-smi -L | tee -a $LOG
if [ "$PHASE" -gt 1 ]; then         # resume: the VAE folder and every variant's run are the earlier phases'
  for variant in $VARIANTS; do
    [ -f $STATE/run_${variant%%:*}/ss_flow/state.pt ] || { echo "no state of ${variant%%:*} in $STATE" | tee -a $LOG; exit 1; }
  done
else                                # phase 1 (not indented: the Python heredocs below must start at column 0)
mkdir -p $VAE $POOL $VAL && cp -r .device_carry/vae/* $VAE/
if [ -n "${INIT_WEIGHTS:-}" ]; then  # start from an earlier variant: the bundled model with its SS weights in
  python -m pixal3d_backend.training.export_default --base $INIT --replace $INIT_WEIGHTS --out /tmp/init || exit 1
  INIT=/tmp/init
fi
python - <<PY                       # the SS decoder inference uses, beside the encoder whose latents the flow learns
import json
from pathlib import Path
from safetensors.torch import load_file, save_file
from pixal3d_backend.training.train import load_weights
path = Path("$VAE/ss_vae/weights.safetensors")
tensors, meta = load_weights(path)
ckpt = Path("$INIT/ckpts/ss_dec_conv3d_small_16l8")
tensors.update({"sparse_structure_decoder." + k: v for k, v in load_file(f"{ckpt}.safetensors").items()})
meta["configs"]["sparse_structure_decoder"] = json.loads(Path(f"{ckpt}.json").read_text())
save_file(tensors, str(path), metadata={"pixal3d": json.dumps(meta)})
PY
for variant in $VARIANTS; do        # preflight: each variant builds and loads its start before the pool is made
  args=${variant#*:}; rm -rf /tmp/preflight && mkdir -p /tmp/preflight && cp -r $VAE/* /tmp/preflight/
  python - ${args//,/ } <<PY || { echo "variant $variant does not start" | tee -a $LOG; exit 1; }
import sys
from pathlib import Path
from pixal3d_backend.training import train
a = train.parser().parse_args(["--stage", "ss_flow", "--minutes", "1", "--out", "/tmp/preflight", *sys.argv[1:]])
t = train.trainer("ss_flow", a)
t.initialise_from(Path("$INIT"))
assert "sparse_structure_decoder" in t.stage.frozen
PY
done
fi
source docs/training/default_model/growing_pool.sh
start_pools $VAE
TRAIN_MIN=$(left 0.1)
echo "phase $PHASE of $PHASES: flows start at $(( $(date +%s) - T0 )) s for $TRAIN_MIN min" | tee -a $LOG
START="--init $INIT"; [ "$PHASE" -gt 1 ] && START="--resume"
DECAY=""; [ "$PHASE" = "$PHASES" ] && DECAY="--lr-decay 0.1"
g=0; NAMES=(); WEIGHTS=""
for variant in $VARIANTS; do
  name=${variant%%:*}; args=${variant#*:}; NAMES+=($name); WEIGHTS="$WEIGHTS $name:$OUT/${name}_weights.safetensors"
  run=$STATE/run_$name
  [ "$PHASE" = 1 ] && rm -rf $run && mkdir -p $run && cp -r $VAE/* $run/
  CUDA_VISIBLE_DEVICES=$g OMP_NUM_THREADS=4 python -m pixal3d_backend.training.train --stage ss_flow \
    --minutes $TRAIN_MIN --out $run --pool $POOL --val-pool $VAL $START --checkpoint-minutes 1.5 \
    $DECAY ${args//,/ } > /tmp/train_$name.log 2>&1 &
  g=$((g + 1))
done
wait
pool_logs
for name in "${NAMES[@]}"; do report $name $STATE/run_$name/ss_flow; done      # OUT/<name>_weights.safetensors
tar -czf $OUT/logs.tgz -C /tmp/logs .
if [ "${EVAL:-}" = 1 ]; then VARIANTS="$WEIGHTS" bash docs/training/default_model/eval_variants.sh; fi
