"""The real `pixal3d serve` with the bundled model, driven by the real client: a job cancelled mid-sampling stops at
the next sampler step, and the warm backend then takes the next job."""
import time

import numpy as np
import pytest

from backend_process import REPO, start_serve, stop_serve
from pixal3d_backend.client import Client
from pixal3d_backend.protocol import Camera, ErrorCode, JobState, Options, ProtocolError, View

MUG = REPO / "examples" / "mug.png"


@pytest.mark.slow
def test_cancel_stops_the_real_pipeline_between_sampler_steps(tmp_path):
    process, address = start_serve(tmp_path / "store", tmp_path / "serve.log")
    try:
        view = View(MUG.read_bytes(), Camera(hfov=np.radians(14.6), width=384, height=384, c2w=np.eye(4)))
        with Client(address, timeout_s=10.0) as client:
            assert client.hello().model_id == "default"
            job_id = client.submit([view], Options(resolution=256, face_target=20_000, texture_size=512))
            deadline = time.monotonic() + 300
            while (status := client.status(job_id)).progress is None or status.progress.step < 1:
                assert time.monotonic() < deadline, f"no sampler progress: {status}"
                time.sleep(0.2)
            assert client.cancel(job_id) is JobState.RUNNING
            cancelled_at = time.monotonic()
            while client.status(job_id).state is JobState.RUNNING:
                assert time.monotonic() - cancelled_at < 30, "the job kept running after cancel"
                time.sleep(0.1)
            assert client.status(job_id).state is JobState.CANCELLED
            with pytest.raises(ProtocolError) as error:
                client.fetch(job_id)
            assert error.value.code is ErrorCode.CANCELLED
            # the backend stays warm and answers at once
            assert client.hello().model_id == "default"
    finally:
        stop_serve(process)
