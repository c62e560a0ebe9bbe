#!/usr/bin/env bash
# Fine-tunes the three flows of the default model on crop views: 4 GPUs generate one shared pool, then the three
# flows train side by side (one GPU each), initialised from the bundled snapshot. Weights + logs go to $OUT.
# Session 3: POOL_MIN=3.3 TRAIN_MIN=5.2 PROCS_PER_GPU=4 FIRST_BATCH=1000 (session 2: the defaults, batches 0..125).
set -u
export PYTHONPATH=$PWD/backend:$PWD/kernels PYTHONUNBUFFERED=1 PIXAL3D_SPARSE_CONV=torch OMP_NUM_THREADS=4
POOL_MIN=${POOL_MIN:-3.8}; TRAIN_MIN=${TRAIN_MIN:-7.5}; INIT=${INIT:-backend/pixal3d_backend/default_model}
FIRST_BATCH=${FIRST_BATCH:-0}   # past the generator batches of earlier pools, so each run adds new views
RUN=/tmp/run; POOL=/tmp/pool; LOG=$OUT/logs.txt
mkdir -p $RUN && cp -r .device_carry/vae/* $RUN/
nvidia-smi -L | tee -a $LOG
# View generation is latency-bound (~1 view/s per process): several processes share each GPU.
PROCS_PER_GPU=${PROCS_PER_GPU:-1}; SHARDS=$((4 * PROCS_PER_GPU))
for k in $(seq 0 $((SHARDS - 1))); do
  CUDA_VISIBLE_DEVICES=$((k % 4)) python -m pixal3d_backend.training.flow_pool --vae $RUN --out $POOL --shard $k \
    --shards $SHARDS --minutes $POOL_MIN --first-batch $FIRST_BATCH > /tmp/pool_$k.log 2>&1 &
done
wait
for k in $(seq 0 $((SHARDS - 1))); do tail -n 2 /tmp/pool_$k.log; done | tee -a $LOG
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
