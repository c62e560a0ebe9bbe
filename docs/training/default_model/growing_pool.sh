# Sourced by grow_x4.sh and ss_variants_x4.sh (4x H200, after OUT, TOTAL_MIN, FIRST_BATCH, VAL_BATCH, POOL, VAL and
# LOG are set): the command's clock, and the growing pool its flows train on.
#   left M       minutes of TOTAL_MIN left after M more (the clock starts when this file is sourced)
#   start_pools RUN
#                4 processes write the validation pool VAL (generator batches from VAL_BATCH, 6 each) unless it is
#                already there, and POOL_PROCS (16: four per GPU) write POOL, a part every minute until a minute
#                before the end: shards POOL_SHARD0 + 0.. of POOL_SHARDS (0, 16) of the batches from FIRST_BATCH, so
#                chained commands growing one pool give distinct batches and file names; both take their latents
#                from the VAE encoders of RUN. Returns once the validation pool is written.
#   pool_logs    the generators' last lines into LOG, and every /tmp/*.log into /tmp/logs (packed by the caller)
#   report NAME DIR
#                a trained stage's output folder DIR: weights to OUT/NAME_weights.safetensors, log.jsonl to
#                /tmp/logs/NAME_log.jsonl, and its trainer's (/tmp/train_NAME.log) pool, validation and loss lines
#                into LOG
T0=$(date +%s)
left() { awk -v t0=$T0 -v now=$(date +%s) -v total=$TOTAL_MIN -v less=$1 'BEGIN{print total - less - (now - t0) / 60}'; }

start_pools() {
  local run=$1 k minutes pids=()
  if ! ls $VAL/shard_*.pt > /dev/null 2>&1; then
    for k in 0 1 2 3; do
      CUDA_VISIBLE_DEVICES=$k OMP_NUM_THREADS=2 python -m pixal3d_backend.training.flow_pool --vae $run --out $VAL \
        --shard $k --shards 4 --minutes 3 --max-batches 6 --first-batch $VAL_BATCH > /tmp/val_$k.log 2>&1 &
      pids+=($!)
    done
  fi
  minutes=$(left 1.0)
  for k in $(seq 0 $((${POOL_PROCS:-16} - 1))); do
    CUDA_VISIBLE_DEVICES=$((k % 4)) OMP_NUM_THREADS=2 python -m pixal3d_backend.training.flow_pool --vae $run \
      --out $POOL --shard $((${POOL_SHARD0:-0} + k)) --shards ${POOL_SHARDS:-16} --minutes $minutes --save-every 1 \
      --first-batch $FIRST_BATCH > /tmp/pool_$k.log 2>&1 &
  done
  if [ ${#pids[@]} -gt 0 ]; then
    wait "${pids[@]}"
    for k in 0 1 2 3; do tail -n 1 /tmp/val_$k.log; done | tee -a $LOG
  fi
}

pool_logs() {
  local k
  for k in $(seq 0 $((${POOL_PROCS:-16} - 1))); do tail -n 1 /tmp/pool_$k.log; done | tee -a $LOG
  mkdir -p /tmp/logs && cp /tmp/*.log /tmp/logs/
}

report() {
  local name=$1 d=$2
  cp $d/weights.safetensors $OUT/${name}_weights.safetensors
  cp $d/log.jsonl /tmp/logs/${name}_log.jsonl
  tail -n 3 /tmp/train_$name.log >> $LOG
  echo "== $name" | tee -a $LOG
  grep '"event": "pool"' $d/log.jsonl | tail -n 2 | cut -c1-200 | tee -a $LOG
  grep '"event": "val"' $d/log.jsonl | cut -c1-200 | tee -a $LOG
  grep -v '"event"' $d/log.jsonl | awk 'NR%20==1' | cut -c1-150 | tee -a $LOG
  echo "$name last: $(grep -v '"event"' $d/log.jsonl | tail -n 1 | cut -c1-300)" | tee -a $LOG
}
