"""Load on the real backend: 8 clients submit 5 jobs each at once to one `pixal3d serve` running the bundled default
model on 127.0.0.1, with a queue of 2 so that most first submissions are answered "busy". Each client is the real
`Client`, retrying a busy submit with exponential backoff. Every one of the 40 jobs must come back as a valid
mesh made from its own request (its seed), none may be lost or fail, and no observer may ever see more jobs
waiting than the queue's bound.

The jobs are the real pipeline made short: one sampler step per stage without classifier-free guidance (one
forward each; the bundled model then makes a small object, ~240 tokens), the smallest face budget and 512² maps,
on a small square input: ~5 s a job on two busy CPU cores instead of ~15 s with guidance. The figures of a run are printed as one JSON
line (`-s` shows it); BENCHMARKS.md records one.
"""
from __future__ import annotations

import dataclasses
import io
import json
import random
import threading
import time

import numpy as np
import pytest
from PIL import Image

from backend_process import start_serve, stop_serve
from pixal3d_backend.client import Busy, Client
from pixal3d_backend.protocol import Camera, JobState, Options, Result, View

CLIENTS, JOBS_PER_CLIENT, QUEUE_SIZE = 8, 5, 2
QUICK = Options(resolution=256, ss_steps=1, ss_guidance=1.0, shape_steps=1, shape_guidance=1.0, tex_steps=1,
                face_target=1_000, texture_size=512)
FIRST_BACKOFF_S, MAX_BACKOFF_S = 0.5, 8.0
CLIENT_TIMEOUT_S = 10.0          # generous: two busy CPU cores also run the model
MONITOR_INTERVAL_S = 0.2


def square_view() -> View:
    """A 128² RGBA image of an opaque square, seen by a 30° camera."""
    rgba = np.zeros((128, 128, 4), np.uint8)
    rgba[..., :3] = (180, 120, 60)
    rgba[34:94, 34:94, 3] = 255
    buffer = io.BytesIO()
    Image.fromarray(rgba).save(buffer, "PNG")
    return View(buffer.getvalue(), Camera(hfov=np.radians(30.0), width=128, height=128, c2w=np.eye(4)))


@dataclasses.dataclass
class Outcome:
    seed: int
    job_id: str
    result: Result
    busy_replies: int
    latency_s: float          # first submit attempt -> result in hand


def submit_with_backoff(client: Client, view: View, options: Options, rng: random.Random) -> tuple[str, int]:
    """Submits until the backend accepts; returns (job id, busy replies)."""
    busy, backoff = 0, FIRST_BACKOFF_S
    while True:
        try:
            return client.submit([view], options), busy
        except Busy:
            busy += 1
            time.sleep(backoff * rng.uniform(0.5, 1.5))    # jitter, so clients do not retry in lockstep
            backoff = min(2 * backoff, MAX_BACKOFF_S)


def run_client(address: str, index: int, view: View, outcomes: list, errors: list, start: threading.Barrier):
    rng = random.Random(index)
    try:
        with Client(address, timeout_s=CLIENT_TIMEOUT_S, name=f"load client {index}") as client:
            start.wait()
            for j in range(JOBS_PER_CLIENT):
                seed = index * JOBS_PER_CLIENT + j
                began = time.monotonic()
                job_id, busy = submit_with_backoff(client, view, dataclasses.replace(QUICK, seed=seed), rng)
                *_, result = client.events(job_id)
                outcomes.append(Outcome(seed, job_id, result, busy, time.monotonic() - began))
    except Exception as error:          # reported by the test, with the client that saw it
        errors.append(f"client {index}: {type(error).__name__}: {error}")


def watch_queue(address: str, stop: threading.Event, depths: list[int]) -> None:
    """Counts the waiting jobs the backend lists, as any client could see them, until `stop`."""
    with Client(address, timeout_s=CLIENT_TIMEOUT_S, name="queue monitor") as client:
        while not stop.wait(MONITOR_INTERVAL_S):
            jobs = client.list_jobs()
            depths.append(sum(job.state is JobState.QUEUED for job in jobs))
            depths.extend(job.queue_position for job in jobs if job.queue_position is not None)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


@pytest.mark.slow
def test_eight_clients_five_jobs_each_all_results_none_lost_queue_bounded(tmp_path):
    process, address = start_serve(tmp_path / "store", tmp_path / "serve.log",
                                   extra_args=["--queue-size", str(QUEUE_SIZE)])
    try:
        with Client(address, timeout_s=CLIENT_TIMEOUT_S) as client:
            assert client.hello().limits["queue_size"] == QUEUE_SIZE
        view = square_view()
        outcomes: list[Outcome] = []
        errors: list[str] = []
        depths: list[int] = []
        start, stop = threading.Barrier(CLIENTS), threading.Event()
        monitor = threading.Thread(target=watch_queue, args=(address, stop, depths))
        clients = [threading.Thread(target=run_client, args=(address, i, view, outcomes, errors, start))
                   for i in range(CLIENTS)]
        began = time.monotonic()
        monitor.start()
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join()
        wall_s = time.monotonic() - began
        stop.set()
        monitor.join()

        assert errors == []
        assert len(outcomes) == CLIENTS * JOBS_PER_CLIENT
        assert len({o.job_id for o in outcomes}) == len(outcomes)
        for outcome in outcomes:
            result = outcome.result
            assert result.job_id == outcome.job_id
            assert result.metadata["seed"] == outcome.seed           # each job ran its own request
            assert len(result.faces) >= 100 and len(result.positions) >= 50
            assert {"base_color", "metallic_roughness"} <= set(result.maps)
        busy_replies = sum(o.busy_replies for o in outcomes)
        assert busy_replies > 0, "the queue never filled: the test did not exercise busy replies"
        assert depths and max(depths) <= QUEUE_SIZE
        with Client(address, timeout_s=CLIENT_TIMEOUT_S) as client:
            states = {job.job_id: job.state for job in client.list_jobs()}
        assert all(states[o.job_id] is JobState.DONE for o in outcomes)
        assert len(states) == len(outcomes)         # no job beyond the 40: every busy submit left nothing behind

        latencies = [o.latency_s for o in outcomes]
        print(json.dumps({"jobs": len(outcomes), "busy_replies": busy_replies, "retries": busy_replies,
                          "wall_s": round(wall_s, 1), "latency_p50_s": round(percentile(latencies, 50), 1),
                          "latency_p95_s": round(percentile(latencies, 95), 1), "queue_max": max(depths),
                          "queue_bound": QUEUE_SIZE,
                          "job_s_mean": round(float(np.mean([o.result.metadata["timings_s"]["total"]
                                                             for o in outcomes])), 2)}))
    finally:
        stop_serve(process)
