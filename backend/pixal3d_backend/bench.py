"""`pixal3d bench`: the full-size Pixal3D architecture on a GPU, stage by stage.

Random weights (unless `--model` names a snapshot) cannot produce a realistic object, so the token sets come from
a procedural object instead (fixed seed): its surface voxels at 32^3 are the sparse structure, at G^3 the HR
tokens, and the decoders are guided through the object's own voxel hierarchy down to 16 G, so every stage works
on the token and voxel counts of a real object. The samplers run the official schedules (CFG, intervals), so the
forward counts are the real ones.

Prints one row per stage (time, tokens, forwards, achieved TFLOP/s against a measured bf16 matmul ceiling, peak
memory) and writes JSON.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .conditioning.image_encoder import DinoV3ProjFeatureExtractor
from .export import ExportOptions, export_asset
from .mesh import orient_outward
from .conditioning.naf import NAF
from .camera import ViewCamera
from .models import build_model
from .official import CHECKPOINTS, DINOV3_VITL16_CONFIG, ENCODER_STAGES
from .pipeline import MAX_NUM_TOKENS, Normalization, Pixal3DPipeline, RunContext
from .sampler import STAGE_DEFAULTS
from .sparse import SparseTensor
from .sparse_conv import CoordinateIndex

CHILD_OFFSETS = torch.tensor([[k & 1, (k >> 1) & 1, (k >> 2) & 1] for k in range(8)], dtype=torch.int32)


# ---------------------------------------------------------------------------------------------------------
# a realistic sparse structure from a procedural object
# ---------------------------------------------------------------------------------------------------------

def object_structure(seed: int, resolution: int, device: torch.device):
    """(image RGBA, ViewCamera, coords32 [N,4], hr coords [M,4], guide subdivisions for the decoders)."""
    from .data import PosedObject, make_object, random_view, render_views, surface_samples
    from .data.grid import surface_voxels

    obj = make_object(seed, device=device)
    field = obj.field(device)
    view = random_view(surface_samples(field, 32).cpu().double().numpy(), np.random.default_rng(seed))
    posed = PosedObject(field, view)
    conditioning = render_views(field, [view], 512).conditioning[0]        # composited on black, as in training
    image = Image.fromarray((conditioning.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy())
    g = resolution // 16

    def level(res):
        # the coarse-to-fine search doubles from its start: 16 for 32, 64, 1024, ...; 12 for 96, ..., 1536
        start = next(s for s in (16, 12, 8) if res % s == 0 and ((res // s) & (res // s - 1)) == 0)
        c = surface_voxels(posed.sdf, res, device, start_resolution=start)
        return torch.cat([torch.zeros_like(c[:, :1]), c], 1).int()

    coords32 = level(32)
    hr = level(g)
    subs, parents = [], hr
    for s in range(4):
        finer = CoordinateIndex(level(g * 2 ** (s + 1)))
        children = (parents[:, None, 1:] * 2 + CHILD_OFFSETS.to(device)).reshape(-1, 3)
        children = torch.cat([parents[:, :1].repeat_interleave(8, 0), children], 1)
        keep = finer.find(children) >= 0
        subs.append(SparseTensor(keep.view(-1, 8).float() * 2 - 1, parents))
        parents = children[keep]
    camera = ViewCamera(fov=view.fov, distance=view.distance, mesh_scale=view.mesh_scale)
    return image, camera, coords32, hr, subs


# ---------------------------------------------------------------------------------------------------------
# the full-size architecture with random weights
# ---------------------------------------------------------------------------------------------------------

def random_pipeline(device: torch.device, low_vram: bool = False, checkpoints: dict = CHECKPOINTS,
                    dinov3_config: dict = DINOV3_VITL16_CONFIG, stages: dict = ENCODER_STAGES) -> Pixal3DPipeline:
    """The official architecture (or other configs of the same classes, for tests) with random weights."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    build_on = torch.device("cpu") if low_vram else device
    with build_on:
        torch.manual_seed(0)
        models = {key: build_model(cfg).eval() for key, (_, cfg) in checkpoints.items()}
        backbone = DINOv3ViTModel(DINOv3ViTConfig(**dinov3_config)).eval()
        naf = NAF().eval()
    encoders = {key: DinoV3ProjFeatureExtractor(dinov3=backbone, naf=naf, **stage)
                for key, stage in stages.items()}
    unit = Normalization(torch.zeros(32), torch.ones(32))
    return Pixal3DPipeline(models, encoders, {k: dict(v) for k, v in STAGE_DEFAULTS.items()}, unit, unit,
                           device=device, low_vram=low_vram)


def flow_flops(model: torch.nn.Module, tokens: int, context: int = 5) -> float:
    """Multiply-adds x 2 of one forward of a flow transformer on `tokens` tokens (linear layers + attention)."""
    c, blocks = model.model_channels, len(model.blocks)
    hidden = model.blocks[0].mlp.mlp[0].out_features
    proj_in = model.blocks[0].cross_attn.proj_linear.in_features
    per_token = blocks * (3 * c * c + c * c + c * c + c * c + proj_in * c + 2 * c * hidden)
    attention = blocks * (2 * tokens * tokens * c + 2 * tokens * context * c)
    return 2.0 * (per_token * tokens + attention + 2 * blocks * context * 1024 * c)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan")


def matmul_ceiling(device: torch.device, n: int = 8192, repeats: int = 20) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * n ** 3 * repeats / (time.perf_counter() - t0) / 1e12


class ForwardCounter:
    """Counts forwards and their FLOPs on a flow model (a forward hook: no change to the model)."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.calls, self.flops = model, 0, 0.0
        self.handle = model.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        x = args[0]
        tokens = x.feats.shape[0] if isinstance(x, SparseTensor) else math.prod(x.shape[2:])
        self.calls += 1
        self.flops += flow_flops(module, tokens)

    def close(self):
        self.handle.remove()


# ---------------------------------------------------------------------------------------------------------
# where a stage's GPU time goes (torch.profiler)
# ---------------------------------------------------------------------------------------------------------

KERNEL_CLASSES = (      # first match wins; lower-case substrings of CUDA kernel names
    ("attention", ("flash", "fmha", "attention", "attn", "sdpa")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "wgmma", "matmul", "cublas")),
    ("memcpy/memset", ("memcpy", "memset")),
    ("norm/softmax/reduce", ("norm", "softmax", "reduce", "welford")),
    ("elementwise/copy/index", ("elementwise", "vectorized", "copy", "cat", "index", "gather", "scatter", "fill")),
)


def kernel_class(name: str) -> str:
    if name.startswith("_") and name.endswith("_kernel"):     # ours: `pixal3d_kernels`' Triton `_..._kernel`s
        return "triton (ours)"
    lower = name.lower()
    return next((cls for cls, keys in KERNEL_CLASSES if any(k in lower for k in keys)), "other")


def busy_microseconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end] intervals: the time the GPU ran at least one kernel."""
    busy, end = 0.0, -math.inf
    for a, b in sorted(intervals):
        if b > end:
            busy += b - max(a, end)
            end = b
    return busy


def profile_summary(prof, wall_seconds: float, top: int = 8) -> dict:
    """GPU time per kernel class, the top kernels, and how much of the stage's wall time the GPU sat idle (launch
    and host gaps) — from the profiler's device-side events."""
    from torch.autograd import DeviceType

    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    per_class: dict[str, float] = {}
    per_kernel: dict[str, float] = {}
    for e in kernels:
        us = e.time_range.elapsed_us()
        per_class[kernel_class(e.name)] = per_class.get(kernel_class(e.name), 0.0) + us
        per_kernel[e.name] = per_kernel.get(e.name, 0.0) + us
    busy = busy_microseconds([(e.time_range.start, e.time_range.end) for e in kernels]) / 1e6
    return {"kernel_seconds": sum(per_class.values()) / 1e6, "gpu_busy_seconds": busy,
            "gpu_idle_share": max(0.0, 1 - busy / wall_seconds), "launches": len(kernels),
            "by_class_seconds": {k: v / 1e6 for k, v in sorted(per_class.items(), key=lambda kv: -kv[1])},
            "top_kernels": [{"name": k[:120], "seconds": v / 1e6}
                            for k, v in sorted(per_kernel.items(), key=lambda kv: -kv[1])[:top]]}


def run_bench(resolution: int, device: torch.device, seed: int = 0, low_vram: bool = False,
              pipe: Pixal3DPipeline | None = None, profile: bool = False,
              exports: tuple[tuple[int, int], ...] = ()) -> dict:
    """One cascade at `resolution`, stage by stage; `profile` adds a torch.profiler summary to each stage's row
    (slower: time it apart from the measured runs). `exports` (faces, texture size): the decoded mesh then goes
    through the service's export (outward winding + `export_asset`, protocol defaults otherwise) for each case,
    timed apart from the neural stages: `to_textured_mesh_seconds` is neural time + that export."""
    pipe = pipe or random_pipeline(device, low_vram)
    image, camera, coords32, hr, subs = object_structure(seed, resolution, device)
    rows = []
    run = RunContext([image], [camera], torch.Generator().manual_seed(seed))

    def stage(name, fn, *args, flow=None, tokens=0):
        counter = ForwardCounter(pipe.models[flow]) if flow else None
        synchronize(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) if profile \
            else contextlib.nullcontext()
        with profiler:
            t0 = time.perf_counter()
            out = fn(*args)
            synchronize(device)
            dt = time.perf_counter() - t0
        row = {"stage": name, "seconds": dt, "tokens": tokens, "peak_gib": peak_memory_gib(device)}
        if profile:
            row["profile"] = profile_summary(profiler, dt)
        if counter:
            counter.close()
            row.update(forwards=counter.calls, tflop=counter.flops / 1e12, tflops_per_s=counter.flops / dt / 1e12)
        rows.append(row)
        return out

    with torch.no_grad():
        stage("sparse_structure", pipe.sample_sparse_structure, run, flow="sparse_structure_flow_model", tokens=16 ** 3)
        slat_lr = stage("shape_lr", pipe.sample_shape_lr, run, coords32, flow="shape_slat_flow_model_512",
                        tokens=coords32.shape[0])
        stage("upsample", pipe.upsample_to_hr, run, slat_lr, resolution, MAX_NUM_TOKENS, tokens=coords32.shape[0])
        shape = stage("shape_hr", pipe.sample_shape_hr, run, hr, resolution, flow="shape_slat_flow_model_1024",
                      tokens=hr.shape[0])
        tex = stage("texture", pipe.sample_texture, run, shape, resolution // 16, flow="tex_slat_flow_model_1024",
                    tokens=hr.shape[0])
        mesh = stage("decode", pipe.decode, shape, tex, resolution, subs, tokens=hr.shape[0])
    total = sum(r["seconds"] for r in rows)
    result = {"resolution": resolution, "low_vram": low_vram, "rows": rows, "total_seconds": total,
              "neural_seconds": total, "decoded_voxels": int(mesh.coords.shape[0]),
              "faces": int(mesh.faces.shape[0]), "peak_gib": max(r["peak_gib"] for r in rows), "exports": []}
    for faces, texture in exports:
        synchronize(device)
        t0 = time.perf_counter()
        oriented = orient_outward(mesh)
        asset = export_asset(oriented.vertices, oriented.faces, oriented.coords, oriented.attrs, resolution,
                             ExportOptions(face_target=faces, texture_size=texture, normal_map=False), device)
        dt = time.perf_counter() - t0
        result["exports"].append({"faces": faces, "texture_size": texture, "seconds": dt,
                                  "faces_out": int(asset.faces.shape[0]), "steps": asset.timings,
                                  "to_textured_mesh_seconds": total + dt})
    return result


def attention_backend_costs(device: torch.device, tokens: int, heads: int = 24, head_dim: int = 64,
                            context: int = 5, new_lengths: int = 3) -> list[dict]:
    """What each SDPA backend costs a job whose token count it has not seen: the first self- and cross-attention
    call at each of `new_lengths` fresh lengths near `tokens` (a CFG pair, bf16, the flows' head size), against
    the median of repeated calls at the last one. cuDNN builds an execution plan per new shape; flash does not."""
    from torch.nn.attention import sdpa_kernel

    from .models.attention import SDPA_BACKENDS

    rows = []
    for offset, name in enumerate(("cudnn", "flash", "efficient")):
        def call(n, kv):
            q = torch.randn(2, heads, n, head_dim, device=device, dtype=torch.bfloat16)
            k = torch.randn(2, heads, kv or n, head_dim, device=device, dtype=torch.bfloat16)
            synchronize(device)
            t0 = time.perf_counter()
            torch.nn.functional.scaled_dot_product_attention(q, k, k)
            synchronize(device)
            return 1e3 * (time.perf_counter() - t0)
        try:
            with sdpa_kernel([SDPA_BACKENDS[name]]):
                lengths = [tokens + 17 * (offset * new_lengths + i) + 1 for i in range(new_lengths)]
                first = [call(n, 0) + call(n, context) for n in lengths]
                steady = sorted(call(lengths[-1], 0) + call(lengths[-1], context) for _ in range(5))[2]
        except RuntimeError as e:          # a backend this GPU / build lacks
            rows.append({"backend": name, "error": str(e).splitlines()[0]})
            continue
        rows.append({"backend": name, "tokens": tokens, "first_call_ms": first, "steady_ms": steady})
    for r in rows:
        if "error" in r:
            print(f"attention {r['backend']:<10} unavailable: {r['error']}")
        else:
            print(f"attention {r['backend']:<10} self+cross at {r['tokens']:,} tokens: steady {r['steady_ms']:.1f} ms, "
                  f"first call at a new length {', '.join(f'{v:.1f}' for v in r['first_call_ms'])} ms")
    return rows


def print_table(result: dict, ceiling: float) -> None:
    print(f"\n== resolution {result['resolution']}{' (low VRAM)' if result['low_vram'] else ''}: "
          f"{result['decoded_voxels']:,} decoded voxels, {result['faces']:,} faces ==")
    print(f"{'stage':<18}{'s':>8}{'tokens':>9}{'fwd':>5}{'TFLOP/s':>9}{'% ceil':>8}{'peak GiB':>10}")
    for r in result["rows"]:
        tf = r.get("tflops_per_s")
        print(f"{r['stage']:<18}{r['seconds']:>8.2f}{r['tokens']:>9,}{r.get('forwards', ''):>5}"
              f"{(f'{tf:.0f}' if tf else ''):>9}{(f'{100 * tf / ceiling:.0f}' if tf else ''):>8}"
              f"{r['peak_gib']:>10.2f}")
    print(f"{'total':<18}{result['total_seconds']:>8.2f}{'':>31}{result['peak_gib']:>10.2f}")
    for e in result["exports"]:
        steps = ", ".join(f"{k} {v:.2f}" for k, v in e["steps"].items())
        print(f"export {e['faces']:,} faces / {e['texture_size']}^2: {e['seconds']:.2f} s ({steps}) -> "
              f"textured mesh {e['to_textured_mesh_seconds']:.2f} s after the start of the cascade")


def print_profile(result: dict) -> None:
    print(f"{'stage':<18}{'wall s':>8}{'GPU busy s':>11}{'idle %':>8}{'launches':>10}  GPU seconds by kernel class")
    for r in result["rows"]:
        p = r["profile"]
        classes = ", ".join(f"{k} {v:.2f}" for k, v in p["by_class_seconds"].items() if v >= 0.005)
        print(f"{r['stage']:<18}{r['seconds']:>8.2f}{p['gpu_busy_seconds']:>11.2f}{100 * p['gpu_idle_share']:>8.0f}"
              f"{p['launches']:>10,}  {classes}")


@contextlib.contextmanager
def plain_pytorch(pipe: Pixal3DPipeline):
    """Our plain-PyTorch paths for everything that has a kernel (`pixal3d_kernels` references, torch sparse conv)
    and CFG as two forwards, as the official code runs it."""
    saved = {k: os.environ.get(k) for k in ("PIXAL3D_KERNELS", "PIXAL3D_SPARSE_CONV")}
    os.environ.update(PIXAL3D_KERNELS="torch", PIXAL3D_SPARSE_CONV="torch")
    batch_cfg, pipe.batch_cfg = pipe.batch_cfg, False
    try:
        yield
    finally:
        pipe.batch_cfg = batch_cfg
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def print_speedups(result: dict) -> None:
    reference = {r["stage"]: r for r in result["reference"]["rows"]}
    print(f"{'stage':<18}{'plain s':>9}{'kernels s':>11}{'speed-up':>10}{'plain peak GiB':>16}")
    for r in result["rows"]:
        ref = reference[r["stage"]]
        print(f"{r['stage']:<18}{ref['seconds']:>9.2f}{r['seconds']:>11.2f}{ref['seconds'] / r['seconds']:>9.2f}x"
              f"{ref['peak_gib']:>16.2f}")
    ref_total = result["reference"]["total_seconds"]
    print(f"{'total':<18}{ref_total:>9.2f}{result['total_seconds']:>11.2f}{ref_total / result['total_seconds']:>9.2f}x"
          f"{result['reference']['peak_gib']:>16.2f}")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="pixal3d bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--resolution", type=int, nargs="+", default=[1024, 1536])
    p.add_argument("--seed", type=int, default=0, help="procedural object seed")
    p.add_argument("--low-vram", action="store_true")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--reference", action="store_true",
                   help="also run each resolution with our plain-PyTorch paths (no Triton kernels, torch sparse "
                        "conv, CFG as two forwards) in this process, and print the speed-up of each stage side by side")
    p.add_argument("--export", nargs="+", default=[], metavar="FACES:TEXTURE",
                   help="also export each run's decoded mesh (e.g. 100000:2048 1000000:4096) and report the time to "
                        "a textured mesh; needs the export dependencies (xatlas, fast_simplification, trimesh)")
    p.add_argument("--attention-backends", action="store_true",
                   help="also time each attention backend (cuDNN, flash, efficient) at new token counts near the HR "
                        "stage's: the per-job cost of cuDNN's execution-plan builds against each backend's speed")
    p.add_argument("--profile", action="store_true",
                   help="after the measured runs, run each resolution once more under torch.profiler and print/write "
                        "where each stage's GPU time goes (kernel classes, top kernels, idle share)")
    a = p.parse_args(argv)
    exports = tuple(tuple(int(float(v)) for v in case.split(":")) for case in a.export)
    if not torch.cuda.is_available():
        raise SystemExit("pixal3d bench needs a CUDA GPU")
    device = torch.device("cuda")
    ceiling = matmul_ceiling(device)
    print(f"{torch.cuda.get_device_name(device)}: measured bf16 matmul ceiling {ceiling:.0f} TFLOP/s")
    pipe = random_pipeline(device, a.low_vram)
    results = []
    for res in a.resolution:
        run_bench(res, device, a.seed, a.low_vram, pipe, exports=exports)  # warm-up (kernels, allocator, caches)
        result = run_bench(res, device, a.seed, a.low_vram, pipe, exports=exports)
        print_table(result, ceiling)
        if a.reference:
            with plain_pytorch(pipe):
                run_bench(res, device, a.seed, a.low_vram, pipe)
                result["reference"] = run_bench(res, device, a.seed, a.low_vram, pipe)
            print_speedups(result)
        results.append(result)

    hr_tokens = next(r["tokens"] for r in results[0]["rows"] if r["stage"] == "shape_hr")
    backends = attention_backend_costs(device, hr_tokens) if a.attention_backends else []

    def write_json():
        if a.json:
            a.json.write_text(json.dumps({"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
                                          "host": platform.node(), "ceiling_tflops": ceiling, "results": results,
                                          "attention_backends": backends,
                                          "sdpa_order": os.environ.get("PIXAL3D_SDPA", "")}, indent=1))
    write_json()
    if a.profile:       # after the measured runs, so the profiler's overhead never touches their figures
        for result in results:
            result["profiled"] = run_bench(result["resolution"], device, a.seed, a.low_vram, pipe, profile=True)
            print(f"\n== resolution {result['resolution']}: profile ==")
            print_profile(result["profiled"])
        write_json()
    return 0
