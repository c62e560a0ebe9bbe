#!/usr/bin/env bash
# Session 4, second call (4x H200): continues the first from its weights (exported into the working tree's default_model first):
#   GPU 0: shape VAE decoder (encoder frozen); GPUs 1-3: a new flow pool (12 processes), then the SS, texture and
#   shape flows (GPU 1, 2, 3).
# Needs .device_carry/vae/<stage>/weights.safetensors: the VAE stages' encoders (never shipped; gitignored, carried).
set -u
export PYTHONPATH=$PWD/backend:$PWD/kernels PYTHONUNBUFFERED=1 PIXAL3D_SPARSE_CONV=torch OMP_NUM_THREADS=4
VAE_MIN=${VAE_MIN:-7.6}; POOL_MIN=${POOL_MIN:-2.3}; TRAIN_MIN=${TRAIN_MIN:-4.9}; FIRST_BATCH=${FIRST_BATCH:-3000}
INIT=backend/pixal3d_backend/default_model
RUN=/tmp/run; POOL=/tmp/pool; LOG=$OUT/logs.txt
mkdir -p $RUN && cp -r .device_carry/vae/* $RUN/
CUDA_VISIBLE_DEVICES=0 python -m pixal3d_backend.training.train --stage shape_vae --minutes $VAE_MIN --out $RUN \
  --init $INIT --freeze-encoder --checkpoint-minutes 2 > /tmp/train_shape_vae.log 2>&1 &
PIDS=()
for k in $(seq 0 11); do
  CUDA_VISIBLE_DEVICES=$((1 + k % 3)) python -m pixal3d_backend.training.flow_pool --vae $RUN --out $POOL --shard $k \
    --shards 12 --minutes $POOL_MIN --first-batch $FIRST_BATCH > /tmp/pool_$k.log 2>&1 &
  PIDS+=($!)
done
wait "${PIDS[@]}"
for k in $(seq 0 11); do tail -n 1 /tmp/pool_$k.log; done | tee -a $LOG
g=1
for s in ss_flow tex_flow shape_flow; do
  CUDA_VISIBLE_DEVICES=$g python -m pixal3d_backend.training.train --stage $s --minutes $TRAIN_MIN --out $RUN \
    --pool $POOL --init $INIT --checkpoint-minutes 2 > /tmp/train_$s.log 2>&1 &
  g=$((g + 1))
done
wait
mkdir -p /tmp/logs
for s in shape_vae ss_flow tex_flow shape_flow; do
  tail -n 3 /tmp/train_$s.log >> $LOG
  cp $RUN/$s/weights.safetensors $OUT/${s}_weights.safetensors
  cp $RUN/$s/log.jsonl /tmp/logs/${s}_log.jsonl
  grep '"event": "pool"' $RUN/$s/log.jsonl | cut -c1-200
  grep -v '"event"' $RUN/$s/log.jsonl | awk 'NR%6==1' | cut -c1-170 | head -8
  echo "$s last: $(grep -v '"event"' $RUN/$s/log.jsonl | tail -n 1 | cut -c1-300)"
done
tar -czf $OUT/logs.tgz -C /tmp/logs .
