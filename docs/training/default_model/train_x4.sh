#!/usr/bin/env bash
# Fine-tunes the three flows of the default model on crop views: 4 GPUs generate one shared pool, then the three
# flows train side by side (one GPU each), initialised from the bundled snapshot. Weights + logs go to $OUT.
set -u
export PYTHONPATH=$PWD/backend:$PWD/kernels PYTHONUNBUFFERED=1 PIXAL3D_SPARSE_CONV=torch
POOL_MIN=${POOL_MIN:-3.8}; TRAIN_MIN=${TRAIN_MIN:-7.5}; INIT=${INIT:-backend/pixal3d_backend/default_model}
FIRST_BATCH=${FIRST_BATCH:-0}   # past the generator batches of earlier pools, so each run adds new views
RUN=/tmp/run; POOL=/tmp/pool; LOG=$OUT/logs.txt
mkdir -p $RUN && cp -r .device_carry/vae/* $RUN/
nvidia-smi -L | tee -a $LOG
for g in 0 1 2 3; do
  CUDA_VISIBLE_DEVICES=$g python -m pixal3d_backend.training.flow_pool --vae $RUN --out $POOL --shard $g \
    --shards 4 --minutes $POOL_MIN --first-batch $FIRST_BATCH > /tmp/pool_$g.log 2>&1 &
done
wait
for g in 0 1 2 3; do tail -n 5 /tmp/pool_$g.log; done | tee -a $LOG
i=0
for s in shape_flow tex_flow ss_flow; do
  CUDA_VISIBLE_DEVICES=$i python -m pixal3d_backend.training.train --stage $s --minutes $TRAIN_MIN --out $RUN \
    --pool $POOL --init $INIT --checkpoint-minutes 2 > /tmp/train_$s.log 2>&1 &
  i=$((i+1))
done
wait
for s in ss_flow shape_flow tex_flow; do
  tail -n 5 /tmp/train_$s.log >> $LOG
  cp $RUN/$s/weights.safetensors $OUT/${s}_weights.safetensors
  cp $RUN/$s/log.jsonl $OUT/${s}_log.jsonl
  grep -v '"event"' $RUN/$s/log.jsonl | tail -n 1
  grep '"event": "pool"' $RUN/$s/log.jsonl
done
