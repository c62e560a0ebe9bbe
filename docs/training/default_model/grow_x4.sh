#!/usr/bin/env bash
# Session 5 (4x H200, `run` from the repo root, OUT set by the device tool): the flows train while their pool grows,
# with a validation loss on views no step trains on, and the texture VAE trains beside them.
#   every GPU: 4 flow_pool processes writing a part every minute (batches from FIRST_BATCH; never used before);
#   first, 4 processes write the validation pool (batches from VAL_BATCH); then, from the bundled model (INIT):
#   GPU 0: SS flow, GPU 1: shape flow, GPU 2: texture flow, all on the growing pool;
#   GPU 3 (from the start): the texture VAE of TEXVAE_FROM/tex_vae, with TEXVAE_ARGS.
# The pool's texture latents come from TEXVAE_FROM's encoder. Needs .device_carry/vae/<stage>/weights.safetensors,
# the VAE stages' encoders (never shipped; gitignored, carried), and TEXVAE_FROM (carried).
# First call:  bash grow_x4.sh   (pool processes at OMP_NUM_THREADS=3 then; the whole texture VAE from its carried encoder and the bundled decoder: its
#              latents carried little colour)
# Second call: FIRST_BATCH=20000 TEXVAE_FROM=.device_carry/texvae1 TEXVAE_ARGS=--freeze-encoder bash grow_x4.sh
#              (the first call's weights exported into INIT, its texture VAE carried; the decoder alone goes on, so
#              the texture flow learns the latents of the encoder it will be shipped with)
# Session 6:   FIRST_BATCH=30000 TEXVAE_FROM=.device_carry/texvae1 FLOW_ARGS="--lr-decay 0.1" SS_VARIANT="--blocks 6"
#              bash grow_x4.sh
#              (every flow's learning rate decays to a tenth; GPU 3 trains a second SS flow, SS_VARIANT's arguments
#              (here deepened to 6 blocks) on the same pool into its own run folder, instead of the texture VAE)
#              then, from that call's 3-block SS flow and the other flows exported into INIT:
#              FIRST_BATCH=40000 TEXVAE_FROM=.device_carry/texvae1 TEXVAE_ARGS="--freeze-encoder --lr-decay 0.1"
#              TEXVAE_INIT=backend/pixal3d_backend/default_model FLOW_ARGS="--lr-decay 0.1" bash grow_x4.sh
#              (the shipped texture decoder goes on, its encoder frozen)
set -u
export PYTHONPATH=$PWD/backend:$PWD/kernels PYTHONUNBUFFERED=1 PIXAL3D_SPARSE_CONV=torch
TOTAL_MIN=${TOTAL_MIN:-8.4}; FIRST_BATCH=${FIRST_BATCH:-10000}; VAL_BATCH=${VAL_BATCH:-50000000}
TEXVAE_FROM=${TEXVAE_FROM:-.device_carry/vae}; TEXVAE_ARGS=${TEXVAE_ARGS:-}; FLOW_ARGS=${FLOW_ARGS:-}
SS_VARIANT=${SS_VARIANT:-}; RUN_B=/tmp/run_b
INIT=backend/pixal3d_backend/default_model
TEXVAE_INIT=${TEXVAE_INIT:-$([ -n "$TEXVAE_ARGS" ] && echo /tmp/texvae || echo $INIT)}   # start of the texture VAE
RUN=/tmp/run; POOL=/tmp/pool; VAL=/tmp/val; TEXVAE=/tmp/texvae; LOG=$OUT/logs.txt
mkdir -p $RUN $RUN_B $POOL $VAL $TEXVAE/tex_vae && cp -r .device_carry/vae/* $RUN/ && cp -r .device_carry/vae/* $RUN_B/
cp $TEXVAE_FROM/tex_vae/weights.safetensors $TEXVAE/tex_vae/ && cp $TEXVAE_FROM/tex_vae/weights.safetensors $RUN/tex_vae/
nvidia-smi -L | tee -a $LOG
source docs/training/default_model/growing_pool.sh
[ -z "$SS_VARIANT" ] && CUDA_VISIBLE_DEVICES=3 OMP_NUM_THREADS=4 python -m pixal3d_backend.training.train --stage tex_vae \
  --minutes $TOTAL_MIN --out $TEXVAE --init $TEXVAE_INIT $TEXVAE_ARGS \
  --checkpoint-minutes 2 > /tmp/train_tex_vae.log 2>&1 &
start_pools $RUN
TRAIN_MIN=$(left 0.1)
echo "flows start at $(( $(date +%s) - T0 )) s for $TRAIN_MIN min" | tee -a $LOG
g=0
for s in ss_flow shape_flow tex_flow; do
  CUDA_VISIBLE_DEVICES=$g OMP_NUM_THREADS=4 python -m pixal3d_backend.training.train --stage $s --minutes $TRAIN_MIN \
    --out $RUN --pool $POOL --val-pool $VAL --init $INIT --checkpoint-minutes 1.5 $FLOW_ARGS > /tmp/train_$s.log 2>&1 &
  g=$((g + 1))
done
[ -n "$SS_VARIANT" ] && CUDA_VISIBLE_DEVICES=3 OMP_NUM_THREADS=4 python -m pixal3d_backend.training.train --stage ss_flow \
  --minutes $TRAIN_MIN --out $RUN_B --pool $POOL --val-pool $VAL --init $INIT --checkpoint-minutes 1.5 $FLOW_ARGS \
  $SS_VARIANT > /tmp/train_ss_flow_b.log 2>&1 &
wait
pool_logs
for s in ss_flow shape_flow tex_flow $([ -n "$SS_VARIANT" ] && echo ss_flow_b || echo tex_vae); do
  d=$RUN/$s; [ $s = tex_vae ] && d=$TEXVAE/$s; [ $s = ss_flow_b ] && d=$RUN_B/ss_flow
  report $s $d
done
tar -czf $OUT/logs.tgz -C /tmp/logs .
