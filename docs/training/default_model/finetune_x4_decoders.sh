#!/usr/bin/env bash
# Session 4, first call (4x H200, `run` from the repo root, OUT set by the device tool): the default model's decoders and SS/texture flows, one 10-minute call.
#   GPU 0: shape VAE decoder, GPU 1: texture VAE decoder (encoders frozen: the flows' latents stay valid)
#   GPU 2+3: a new flow pool (8 processes, batches from FIRST_BATCH), then the SS flow (GPU 2) and texture flow (GPU 3)
# Needs .device_carry/vae/<stage>/weights.safetensors: the VAE stages' encoders (never shipped; gitignored, carried).
set -u
export PYTHONPATH=$PWD/backend:$PWD/kernels PYTHONUNBUFFERED=1 PIXAL3D_SPARSE_CONV=torch OMP_NUM_THREADS=4
VAE_MIN=${VAE_MIN:-8.6}; POOL_MIN=${POOL_MIN:-3.0}; TRAIN_MIN=${TRAIN_MIN:-5.2}; FIRST_BATCH=${FIRST_BATCH:-2000}
INIT=backend/pixal3d_backend/default_model
RUN=/tmp/run; POOL=/tmp/pool; LOG=$OUT/logs.txt
mkdir -p $RUN && cp -r .device_carry/vae/* $RUN/
nvidia-smi -L | tee -a $LOG
unset TRITON_INTERPRET
timeout 60 python -m pytest -q -p no:cacheprovider -rf --tb=line tests/kernels/test_dit_pointwise.py 2>&1 | tail -6 | tee -a $LOG
for s in shape_vae tex_vae; do
  g=$([ $s = shape_vae ] && echo 0 || echo 1)
  CUDA_VISIBLE_DEVICES=$g python -m pixal3d_backend.training.train --stage $s --minutes $VAE_MIN --out $RUN \
    --init $INIT --freeze-encoder --checkpoint-minutes 2 > /tmp/train_$s.log 2>&1 &
done
PIDS=()
for k in $(seq 0 7); do
  CUDA_VISIBLE_DEVICES=$((2 + k % 2)) python -m pixal3d_backend.training.flow_pool --vae $RUN --out $POOL --shard $k \
    --shards 8 --minutes $POOL_MIN --first-batch $FIRST_BATCH > /tmp/pool_$k.log 2>&1 &
  PIDS+=($!)
done
wait "${PIDS[@]}"
for k in $(seq 0 7); do tail -n 1 /tmp/pool_$k.log; done | tee -a $LOG
CUDA_VISIBLE_DEVICES=2 python -m pixal3d_backend.training.train --stage ss_flow --minutes $TRAIN_MIN --out $RUN \
  --pool $POOL --init $INIT --checkpoint-minutes 2 > /tmp/train_ss_flow.log 2>&1 &
CUDA_VISIBLE_DEVICES=3 python -m pixal3d_backend.training.train --stage tex_flow --minutes $TRAIN_MIN --out $RUN \
  --pool $POOL --init $INIT --checkpoint-minutes 2 > /tmp/train_tex_flow.log 2>&1 &
wait
mkdir -p /tmp/logs
for s in shape_vae tex_vae ss_flow tex_flow; do
  tail -n 3 /tmp/train_$s.log >> $LOG
  cp $RUN/$s/weights.safetensors $OUT/${s}_weights.safetensors
  cp $RUN/$s/log.jsonl /tmp/logs/${s}_log.jsonl
  echo "$s: $(grep -v '"event"' $RUN/$s/log.jsonl | tail -n 1)" | cut -c1-400
  grep '"event": "pool"' $RUN/$s/log.jsonl | cut -c1-200
  grep -v '"event"' $RUN/$s/log.jsonl | awk 'NR%8==1' | cut -c1-160 | head -8
done
tar -czf $OUT/logs.tgz -C /tmp/logs . /tmp/pool_0.log 2>/dev/null
