"""Side-by-side timing of a kernel and its reference, shared by every `python -m pixal3d_kernels.bench_*`.

Times are medians of CUDA-event-timed repeats after warm-up (wall clock with synchronisation on CPU). Each bench
prints a table and can write JSON rows: {"kernel", "case", "impl", "ms", ...}.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Callable

import torch

from . import interpreting


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int = 3, repeats: int = 10) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            torch.cuda.synchronize(device)
            samples.append(start.elapsed_time(stop))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def hardware(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"


def parser(description: str, default_dtype: str = "float32") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="append the rows to this JSON file")
    p.add_argument("--quick", action="store_true", help="small sizes (CPU smoke run)")
    p.add_argument("--dtype", default=default_dtype, choices=["float16", "bfloat16", "float32"])
    return p


def parse_args(description: str, argv: list[str] | None, default_dtype: str = "float32"
               ) -> tuple[argparse.Namespace, torch.device, torch.dtype, bool]:
    """(args, device, dtype, whether the Triton kernels run: on a GPU, or on CPU through the interpreter)."""
    args = parser(description, default_dtype).parse_args(argv)
    device = torch.device(args.device)
    return args, device, getattr(torch, args.dtype), device.type == "cuda" or interpreting()


def report(rows: list[dict], device: torch.device, json_path: str | None) -> None:
    """Prints `rows` as a table (speedup of each non-reference impl over the reference of its case)."""
    ref = {(r["kernel"], r["case"]): r["ms"] for r in rows if r["impl"] == "reference"}
    print(f"# {hardware(device)}, torch {torch.__version__}")
    print(f"{'kernel':<18}{'case':<34}{'impl':<12}{'ms':>10}{'vs ref':>9}")
    for r in rows:
        base = ref.get((r["kernel"], r["case"]))
        ratio = f"{base / r['ms']:.2f}x" if base and r["impl"] != "reference" else ""
        print(f"{r['kernel']:<18}{r['case']:<34}{r['impl']:<12}{r['ms']:>10.3f}{ratio:>9}")
    if json_path:
        try:
            with open(json_path) as f:
                old = json.load(f)
        except FileNotFoundError:
            old = []
        with open(json_path, "w") as f:
            json.dump(old + [{**r, "hardware": hardware(device)} for r in rows], f, indent=1)
