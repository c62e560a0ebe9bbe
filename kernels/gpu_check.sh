#!/usr/bin/env bash
# Kernel checks on the GPU machine: the kernel tests compiled on CUDA (TRITON_INTERPRET unset) and the benchmarks,
# JSON and logs under $OUT. Run from anywhere:  OUT=/some/dir bash kernels/gpu_check.sh [GROUP ...]
# Groups: conv (sparse conv + neighbour map), attention (NAF), dit (flow blocks' fused pointwise kernels), lift,
# export; default: all of them (~13 min, more than one device command allows: run them in two calls).
# Every section runs under its own time limit and the script goes on when one fails; a summary table ends it.
# spconv is compared when importable (put its prefix on PYTHONPATH first). Total: about 3 minutes on an H200.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/pixal3d_gpu_check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/backend:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET PIXAL3D_KERNELS
PY=${PYTHON:-python}
SUMMARY=()
GROUPS_WANTED=" ${*:-conv attention dit lift export} "
wants() { [[ $GROUPS_WANTED == *" $1 "* ]]; }

# section NAME SECONDS COMMAND...: runs COMMAND with a time limit, log in $OUT/NAME.log (its tail printed)
section() {
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 40 "$OUT/$name.log"
    SUMMARY+=("$(printf '%-32s %4s %6ss' "$name" "$rc" "$((SECONDS - start))")")
}

"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, \
torch.cuda.get_device_name())" 2>&1 | tee "$OUT/versions.log"
"$PY" -c "import spconv; print('spconv', spconv.__version__)" >>"$OUT/versions.log" 2>&1 || echo "spconv: not importable" | tee -a "$OUT/versions.log"

# --- sparse conv, neighbour map, neighbourhood attention --------------------------------------------------
if wants conv; then
    section sparse_conv_tests 150 "$PY" -m pytest -q -p no:cacheprovider \
        tests/kernels/test_sparse_conv_kernels.py tests/test_sparse_conv.py
    section bench_sparse_conv_fp16 180 "$PY" -m pixal3d_kernels.bench_sparse_conv --json "$OUT/bench_sparse_conv.json"
fi
if wants attention; then
    section attention_tests 60 "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_neighborhood_attention_kernels.py
    section bench_neighborhood_attention_fp32 90 "$PY" -m pixal3d_kernels.bench_neighborhood_attention \
        --json "$OUT/bench_neighborhood_attention.json"
    section bench_neighborhood_attention_fp16 90 "$PY" -m pixal3d_kernels.bench_neighborhood_attention \
        --dtype float16 --json "$OUT/bench_neighborhood_attention.json"
fi
if wants dit; then
    section dit_pointwise_tests 90 "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_dit_pointwise.py \
        tests/test_flow_models.py -k "pointwise or fused_block"
    section bench_dit_pointwise 60 "$PY" -m pixal3d_kernels.bench_dit_pointwise --json "$OUT/bench_dit_pointwise.json"
fi

# --- projection lifting, UV raster + voxel sampling, GPU export (about 4 minutes) ----------------------------
# The export needs xatlas, fast_simplification and trimesh: the wheels carried in .whl/export go to /tmp/site.
if ls .whl/export/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/export/*.whl >"$OUT/export_wheels.log" 2>&1
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
if wants lift; then
    section lift_tests 40 "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_proj_lift.py
    section bench_proj_lift 30 "$PY" -m pixal3d_kernels.bench_proj_lift --json "$OUT/bench_proj_lift.json"
fi
if wants export; then
    section raster_export_tests 70 "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_uv_raster.py \
        tests/test_export.py -k "not blender"
    section bench_export 170 "$PY" -m pixal3d_kernels.bench_export --json "$OUT/bench_export.json"
fi

# --- summary ------------------------------------------------------------------------------------------------
echo
printf '%-32s %4s %7s\n' section rc time
printf '%s\n' "${SUMMARY[@]}"
echo "logs and JSON: $OUT"
