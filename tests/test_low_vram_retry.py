"""Running out of GPU memory mid-job, with the real server, the real `service.Generator` and the bundled model's
real pipeline: the job runs again with the model switched to low-VRAM mode and succeeds, saying so in its
metadata; a second out-of-memory error is the job's clear error, and the server keeps serving.

A CPU cannot run out of CUDA memory, so the sparse-structure flow's forward raises the real
`torch.OutOfMemoryError` (what the CUDA caching allocator raises) a given number of times, and otherwise runs.
On a GPU, `tests/gpu/check_low_vram_retry.py` makes a real generation run out of memory.
"""
import time

import numpy as np

import pytest
import torch

from pixal3d_backend.client import Client
from pixal3d_backend.loading import load_model
from pixal3d_backend.protocol import ErrorCode, JobState, ProtocolError, Result
from pixal3d_backend.server import LOW_VRAM_RETRY_STAGE, Server
from pixal3d_backend.service import Generator
from test_load import QUICK, square_view


class OutOfMemoryOnForward:
    """Replaces `module.forward`: raises torch.OutOfMemoryError on the next `failures` calls, then runs the real
    forward, noting whether the pipeline was in low-VRAM mode when it did."""

    def __init__(self, module: torch.nn.Module, pipeline):
        self.forward, self.pipeline = module.forward, pipeline
        self.failures, self.low_vram_when_run = 0, []
        module.forward = self

    def __call__(self, *args, **kwargs):
        if self.failures > 0:
            self.failures -= 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                         "capacity of 8.00 GiB of which 1.10 GiB is free.")
        self.low_vram_when_run.append(self.pipeline.low_vram)
        return self.forward(*args, **kwargs)


def follow(client: Client, job_id: str) -> tuple[Result, list[str]]:
    """The job's result and the progress stages seen on the way."""
    stages = []
    for update in client.events(job_id):
        if isinstance(update, Result):
            return update, stages
        if update.progress is not None and update.progress.stage not in stages:
            stages.append(update.progress.stage)
    raise AssertionError("no result")


@pytest.mark.slow
def test_out_of_memory_retries_in_low_vram_mode_then_reports_a_second_one(tmp_path):
    model = load_model(device="cpu")
    generator = Generator(model)
    assert generator.low_vram is False
    flow = OutOfMemoryOnForward(model.pipeline.models["sparse_structure_flow_model"], model.pipeline)
    with Server(generator, bind="tcp://127.0.0.1:*", store_dir=tmp_path / "store") as server, \
            Client(server.address, timeout_s=10.0, heartbeat_s=0.05) as client:
        flow.failures = 1
        result, stages = follow(client, client.submit([square_view()], QUICK))
        assert "CUDA out of memory" in result.metadata["low_vram_retry"]
        assert LOW_VRAM_RETRY_STAGE in stages          # the client saw it start again
        assert flow.low_vram_when_run[0] is True and generator.low_vram is True   # and it stays on
        assert len(result.faces) > 0 and result.metadata["seed"] == QUICK.seed

        flow.failures = 1           # already in low-VRAM mode: nothing left to try
        job_id = client.submit([square_view()], QUICK)
        with pytest.raises(ProtocolError) as out_of_memory:
            follow(client, job_id)
        assert out_of_memory.value.code is ErrorCode.OUT_OF_MEMORY
        message = out_of_memory.value.message
        assert "even in low-VRAM mode" in message and "turn on low_vram" not in message
        assert "close other programs" in message
        assert client.status(job_id).state is JobState.FAILED
        started = time.monotonic()
        assert client.hello().model_id == "default" and time.monotonic() - started < 1.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="low-VRAM mode moves weights between host and a CUDA GPU")
def test_low_vram_mode_computes_the_resident_result_and_keeps_weights_pinned_on_the_host():
    from PIL import Image

    from pixal3d_backend.camera import ViewCamera
    image = Image.open(__file__.rsplit("/tests/", 1)[0] + "/examples/mug.png")
    camera = ViewCamera(fov=float(np.radians(30)), distance=2.0)
    steps = {stage: {"steps": 2} for stage in ("sparse_structure", "shape", "texture")}

    def generate(low_vram):
        pipeline = load_model(device="cuda", low_vram=low_vram).pipeline
        return pipeline, pipeline.run(image, camera, seed=3, resolution=256, sampler_overrides=steps)

    _, resident = generate(False)
    pipeline, offloaded = generate(True)
    torch.testing.assert_close(offloaded.mesh.vertices, resident.mesh.vertices)
    torch.testing.assert_close(offloaded.mesh.attrs, resident.mesh.attrs)
    weights = [t for m in pipeline._modules() for t in [*m.parameters(), *m.buffers()]]
    assert all(t.device.type == "cpu" and t.is_pinned() for t in weights)
    # (the bundled model's weights are too small beside its activations for a peak comparison: `pixal3d bench
    # --low-vram` measures that on the full-size architecture)


def test_low_vram_is_the_default_on_gpus_under_32_gib_and_the_flag_decides_otherwise(monkeypatch):
    """`pixal3d serve/generate/eval`: no flag -> low-VRAM on a GPU with less than 32 GiB (the full-size cascade
    peaks at ~20 GiB resident), off on larger GPUs and on the CPU; `--low-vram` / `--no-low-vram` decide."""
    import argparse

    from pixal3d_backend import service
    assert service.default_low_vram("cpu") is False

    class Properties:                       # what torch.cuda.get_device_properties reports (no GPU here)
        total_memory = 24 * 2 ** 30
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Properties)
    assert service.default_low_vram("cuda:0") is True
    Properties.total_memory = 80 * 2 ** 30
    assert service.default_low_vram("cuda") is False
    parser = argparse.ArgumentParser()
    service.add_model_arguments(parser)
    assert [parser.parse_args(flags).low_vram for flags in ([], ["--low-vram"], ["--no-low-vram"])] == [None, True, False]


def test_a_job_that_asks_for_low_vram_switches_the_backend_to_it():
    """The add-on's "Low VRAM" option (protocol `Options.low_vram`) reaches the backend: the job runs in low-VRAM
    mode, and so does every later job."""
    import dataclasses

    from pixal3d_backend import protocol
    generator = Generator(load_model(device="cpu"))
    request = protocol.check(protocol.SubmitRequest([square_view()], dataclasses.replace(QUICK, low_vram=True)))
    generation = generator.run(request, lambda *_: None, lambda: False)
    assert generator.low_vram is True and len(generation.asset.faces) > 0
