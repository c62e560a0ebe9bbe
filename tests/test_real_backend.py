"""The real `pixal3d serve` with the bundled model, driven by the real client: a job cancelled mid-sampling stops at
the next sampler step; a backend killed mid-job is reported within 5 s, and once restarted it still serves the
results finished before the kill and takes new jobs."""
import signal
import time

import numpy as np
import pytest

from backend_process import REPO, start_serve, stop_serve
from pixal3d_backend.client import DEFAULT_TIMEOUT_S, BackendUnavailable, Client
from pixal3d_backend.protocol import Camera, ErrorCode, JobState, Options, ProtocolError, Result, View

MUG = REPO / "examples" / "mug.png"
# A short job: 2 sampler steps a stage and a small asset (the real pipeline, just less of it).
QUICK = Options(resolution=256, ss_steps=2, shape_steps=2, tex_steps=2, face_target=5_000, texture_size=512)


def mug_view() -> View:
    return View(MUG.read_bytes(), Camera(hfov=np.radians(14.6), width=384, height=384, c2w=np.eye(4)))


def run_to_result(client: Client, job_id: str) -> Result:
    *_, last = client.events(job_id)
    assert isinstance(last, Result), last
    return last


@pytest.mark.slow
def test_cancel_stops_the_real_pipeline_between_sampler_steps(tmp_path):
    process, address = start_serve(tmp_path / "store", tmp_path / "serve.log")
    try:
        view = mug_view()
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


@pytest.mark.slow
def test_killed_backend_is_reported_and_restarted_backend_serves_old_and_new_jobs(tmp_path):
    store = tmp_path / "store"
    process, address = start_serve(store, tmp_path / "serve.log")
    try:
        with Client(address, timeout_s=DEFAULT_TIMEOUT_S, heartbeat_s=0.5) as client:   # the add-on's default
            finished = client.submit([mug_view()], QUICK)
            result = run_to_result(client, finished)
            doomed = client.submit([mug_view()], Options(resolution=256, texture_size=512))
            while client.status(doomed).state is not JobState.RUNNING:
                time.sleep(0.1)
            process.send_signal(signal.SIGKILL)
            process.wait()
            killed_at = time.monotonic()
            with pytest.raises(BackendUnavailable):
                for _ in client.events(doomed):
                    pass
            assert time.monotonic() - killed_at < 5.0
            process, _ = start_serve(store, tmp_path / "serve2.log", port=int(address.rsplit(":", 1)[1]))
            np.testing.assert_array_equal(client.fetch(finished).positions, result.positions)
            with pytest.raises(ProtocolError) as lost:
                client.status(doomed)
            assert lost.value.code is ErrorCode.UNKNOWN_JOB
            assert len(run_to_result(client, client.submit([mug_view()], QUICK)).faces) > 0
    finally:
        stop_serve(process)
