"""GPU check of the out-of-memory retry: a real generation that runs out of CUDA memory must recover in low-VRAM
mode. A script, not a pytest test (it needs CUDA); run it on the GPU machine from the repository root:

    .venv/bin/python tests/gpu/check_low_vram_retry.py                         # the bundled model
    .venv/bin/python tests/gpu/check_low_vram_retry.py --model TencentARC/Pixal3D --resolution 1024

1. One job with the model in low-VRAM mode, then one with every model resident: their peak CUDA memory
   (reserved by PyTorch's allocator, which is what a memory cap limits).
2. This process's CUDA memory is capped halfway between the two (torch.cuda.set_per_process_memory_fraction).
3. The same job through a real `Server` and `Client` on 127.0.0.1 with the model resident: it must run out of
   memory, switch to low-VRAM mode and succeed (result metadata `low_vram_retry`); then the backend must still
   answer. The figures are printed as one JSON line; the exit status is 0 when the job recovered.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pixal3d_backend.client import Client
from pixal3d_backend.loading import load_model
from pixal3d_backend.protocol import Camera, Options, ProtocolError, Result, SubmitRequest, View
from pixal3d_backend.server import Server
from pixal3d_backend.service import Generator

REPO = Path(__file__).resolve().parents[2]
MUG = REPO / "examples" / "mug.png"
MUG_HFOV_DEG = 14.6
MIN_WINDOW_SHARE = 0.05       # low-VRAM mode must save at least this share of the peak for a cap to fall between


def mug_request(options: Options) -> SubmitRequest:
    camera = Camera(hfov=np.radians(MUG_HFOV_DEG), width=384, height=384, c2w=np.eye(4))
    return SubmitRequest([View(MUG.read_bytes(), camera)], options)


def peak_reserved(generator: Generator, request: SubmitRequest) -> int:
    """Peak bytes the allocator reserved during one job, starting from an emptied cache."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    generator.generate(request, lambda stage, step, total: None, lambda: False)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_reserved()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="snapshot folder or cached repo id; default: the bundled model")
    p.add_argument("--dinov3")
    p.add_argument("--naf")
    p.add_argument("--resolution", type=int, help="default: the model's own")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("check_low_vram_retry: needs a CUDA GPU", file=sys.stderr)
        return 2

    def load(low_vram: bool):
        return load_model(a.model, device="cuda", low_vram=low_vram, dinov3_path=a.dinov3, naf_path=a.naf)

    low = load(low_vram=True)
    options = Options(**{**low.default_options, **({"resolution": a.resolution} if a.resolution else {})})
    request = mug_request(options)
    peak_low = peak_reserved(Generator(low), request)
    del low
    model = load(low_vram=False)
    peak_full = peak_reserved(Generator(model), request)
    total = torch.cuda.get_device_properties(0).total_memory
    figures = {"device": torch.cuda.get_device_name(0), "model": model.model_id, "resolution": options.resolution,
               "peak_low_vram_gib": round(peak_low / 2**30, 2), "peak_resident_gib": round(peak_full / 2**30, 2)}
    if peak_full - peak_low < MIN_WINDOW_SHARE * peak_full:
        print(json.dumps(figures))
        print("check_low_vram_retry: low-VRAM mode saves too little of this model's peak for a cap between the two; "
              "use the official weights (--model TencentARC/Pixal3D)", file=sys.stderr)
        return 2
    cap = (peak_low + peak_full) // 2
    figures["cap_gib"] = round(cap / 2**30, 2)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(cap / total)

    generator = Generator(model)
    with tempfile.TemporaryDirectory() as store, \
            Server(generator, bind="tcp://127.0.0.1:*", store_dir=store) as server, \
            Client(server.address, timeout_s=30.0) as client:
        started = time.monotonic()
        job_id = client.submit(request.views, options)
        try:
            *_, result = client.events(job_id)
            figures["low_vram_retry"] = result.metadata.get("low_vram_retry")
            figures["faces"] = len(result.faces)
        except ProtocolError as error:
            result, figures["error"], figures["low_vram_retry"] = None, str(error), None
        figures["job_wall_s"] = round(time.monotonic() - started, 1)
        figures["low_vram_after"] = generator.low_vram
        figures["backend_answers_after"] = client.hello().model_id == model.model_id
    print(json.dumps(figures))
    recovered = (isinstance(result, Result) and figures["low_vram_retry"] is not None and generator.low_vram
                 and figures["backend_answers_after"])
    print("recovered in low-VRAM mode" if recovered else "did NOT recover as expected", file=sys.stderr)
    return 0 if recovered else 1


if __name__ == "__main__":
    sys.exit(main())
