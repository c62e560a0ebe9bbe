"""The backend server and client over real ZeroMQ sockets on 127.0.0.1: a server in a thread and a server as a
real `pixal3d serve` subprocess, driven by `SilhouetteGenerator`.

Run as a script, this file is that subprocess: `serve_main` with the SilhouetteGenerator.
"""
import io
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import zmq
from PIL import Image

from pixal3d_backend import protocol
from pixal3d_backend.camera import CropCamera
from pixal3d_backend.client import AccessRefused, BackendUnavailable, Busy, Client
from pixal3d_backend.protocol import ErrorCode, JobState, JobStatus, Options, ProtocolError, Result, View
from pixal3d_backend.server import Server, keys_main, read_key, serve_main, write_keypair

from test_protocol import BAD_INPUTS, camera_for, object_png, object_view

REPO = pathlib.Path(__file__).resolve().parents[1]


class SilhouetteGenerator:
    """Stand-in for the Pixal3D pipeline until `service.create_generator` is wired in: real work on the real
    protocol types. It turns the first view's alpha mask into a flat mesh (a quad per opaque cell of a grid over
    the image), textures it with the input image, places it in the view's camera, and reports one progress step
    per `options.ss_steps`, sleeping `step_s` in each (so tests can cancel or kill a job mid-way)."""

    GRID = 16

    def __init__(self, step_s: float = 0.0, out_of_memory_once: bool = False, default_options: dict | None = None):
        self.step_s = step_s
        self.out_of_memory_once = out_of_memory_once
        self.default_options = default_options      # what it suggests, as a model's pipeline.json would

    def capabilities(self) -> dict:
        caps = {"device": "cpu", "free_memory_bytes": None, "model_id": "test-silhouette",
                "model_hash": "sha256:silhouette", "resolutions": [1024, 1536], "max_views": 4, "multiview": True}
        return caps if self.default_options is None else {**caps, "default_options": self.default_options}

    def generate(self, request, on_progress, should_cancel) -> Result:
        if self.out_of_memory_once:
            self.out_of_memory_once = False
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")
        total = request.options.ss_steps
        for step in range(total):
            on_progress("silhouette", step, total)
            time.sleep(self.step_s)
        view = request.views[0]
        rgba = np.asarray(Image.open(io.BytesIO(view.image_png)).convert("RGBA"))
        h, w = rgba.shape[:2]
        n = self.GRID
        centres = ((np.arange(n) + 0.5) / n)
        opaque = rgba[(centres * h).astype(int)][:, (centres * w).astype(int), 3] >= 128      # [row, column]
        i, j = np.meshgrid(np.arange(n + 1), np.arange(n + 1))                                  # column, row
        positions = np.stack([i / n - 0.5, 0.5 - j / n, np.zeros_like(i, float)], -1).reshape(-1, 3)
        rows, cols = np.nonzero(opaque)
        corner = rows * (n + 1) + cols
        faces = np.concatenate([np.stack([corner, corner + n + 1, corner + 1], 1),
                                np.stack([corner + 1, corner + n + 1, corner + n + 2], 1)])
        uvs = np.stack([i / n, 1.0 - j / n], -1).reshape(-1, 2)
        size = request.options.texture_size
        crop = CropCamera.from_crop(view.camera.intrinsics(), w / 2.0, h / 2.0, float(max(w, h)))
        return Result(positions=positions.astype(np.float32), faces=faces.astype(np.uint32),
                      uvs=uvs.astype(np.float32), normals=np.tile(np.float32([0, 0, -1]), (len(positions), 1)),
                      maps={"base_color": _png(Image.fromarray(rgba).resize((size, size))),
                            "metallic_roughness": _png(Image.new("RGB", (size, size), (0, 200, 0)))},
                      glb_to_camera=crop.glb_to_camera(), metadata={"seed": request.options.seed,
                                                                    "opaque_cells": int(opaque.sum())})


class NaNMeshGenerator(SilhouetteGenerator):
    """A buggy pipeline: its mesh has a NaN vertex."""

    def generate(self, request, on_progress, should_cancel) -> Result:
        result = super().generate(request, on_progress, should_cancel)
        result.positions[0, 0] = np.nan
        return result


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


FAST = Options(ss_steps=2, texture_size=512)
SLOW_STEP_S = 0.1


@pytest.fixture
def serve(tmp_path):
    """Starts Servers on a free loopback port in this process; stops them after the test."""
    running = []

    def start(generator=None, **kwargs) -> Server:
        kwargs.setdefault("store_dir", tmp_path / "store")
        server = Server(generator or SilhouetteGenerator(), bind="tcp://127.0.0.1:*", **kwargs).start()
        running.append(server)
        return server

    yield start
    for server in running:
        server.stop()


def client_for(server_or_address, **kwargs) -> Client:
    address = getattr(server_or_address, "address", server_or_address)
    kwargs.setdefault("timeout_s", 2.0)
    return Client(address, heartbeat_s=0.05, **kwargs)


def wait_for(client: Client, job_id: str, predicate, timeout_s: float = 5.0) -> JobStatus:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = client.status(job_id)
        if predicate(status):
            return status
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} never reached the expected state; last {status}")


def run_to_result(client: Client, job_id: str) -> Result:
    *updates, result = list(client.events(job_id))
    assert all(isinstance(u, JobStatus) for u in updates)
    return result


# ---------------------------------------------------------------------------------------------------------

def test_job_round_trip(serve):
    server = serve()
    with client_for(server) as client:
        caps = client.hello()
        assert (caps.model_id, caps.protocol_version, caps.limits["queue_size"]) == ("test-silhouette", 1, 4)
        job_id = client.submit([object_view(96, 64)], Options(seed=5, ss_steps=3, texture_size=512))
        result = run_to_result(client, job_id)
        assert result.job_id == job_id and result.metadata["seed"] == 5
        # The mesh covers the disc of the input's alpha mask and nothing else.
        assert 0 < len(result.faces) == 2 * result.metadata["opaque_cells"] < 2 * SilhouetteGenerator.GRID ** 2
        assert Image.open(io.BytesIO(result.maps["base_color"])).size == (512, 512)
        assert result.glb_to_camera[2, 3] < 0      # the object lies in front of the camera
        assert [j.state for j in client.list_jobs() if j.job_id == job_id] == [JobState.DONE]
        np.testing.assert_array_equal(client.fetch(job_id).positions, result.positions)


def test_progress_is_reported_while_the_job_runs(serve):
    server = serve(SilhouetteGenerator(step_s=0.05))
    with client_for(server) as client:
        job_id = client.submit([object_view()], Options(ss_steps=10, texture_size=512))
        steps = [u.progress.step for u in client.events(job_id)
                 if isinstance(u, JobStatus) and u.state is JobState.RUNNING]
        assert len(set(steps)) >= 3 and steps == sorted(steps)


def test_full_queue_answers_busy_at_once(serve):
    server = serve(SilhouetteGenerator(step_s=SLOW_STEP_S), queue_size=1)
    with client_for(server) as client:
        slow = Options(ss_steps=100, texture_size=512)
        running = client.submit([object_view()], slow)
        wait_for(client, running, lambda s: s.state is JobState.RUNNING)
        waiting = client.submit([object_view()], slow)
        assert client.status(waiting).queue_position == 1
        started = time.monotonic()
        with pytest.raises(Busy) as busy:
            client.submit([object_view()], slow)
        assert busy.value.code is ErrorCode.BUSY and time.monotonic() - started < 1.0
        assert client.cancel(waiting) is JobState.CANCELLED
        client.cancel(running)
        retried = client.submit([object_view()], FAST)     # room again once the queue drains
        assert isinstance(run_to_result(client, retried), Result)


def test_cancel_mid_job(serve):
    server = serve(SilhouetteGenerator(step_s=SLOW_STEP_S))
    with client_for(server) as client:
        job_id = client.submit([object_view()], Options(ss_steps=100, texture_size=512))
        wait_for(client, job_id, lambda s: s.progress is not None and s.progress.step >= 2)
        assert client.cancel(job_id) is JobState.RUNNING        # stops at its next progress report
        started = time.monotonic()
        with pytest.raises(ProtocolError) as cancelled:
            client.poll(job_id, timeout_s=3.0)
        assert cancelled.value.code is ErrorCode.CANCELLED and time.monotonic() - started < 1.0
        assert client.status(job_id).state is JobState.CANCELLED
        with pytest.raises(ProtocolError, match="CANCELLED"):
            client.fetch(job_id)
        assert isinstance(run_to_result(client, client.submit([object_view()], FAST)), Result)


def test_unknown_and_unfinished_jobs(serve):
    server = serve(SilhouetteGenerator(step_s=SLOW_STEP_S))
    with client_for(server) as client:
        for call in (client.cancel, client.status, client.fetch):
            with pytest.raises(ProtocolError) as unknown:
                call("0" * 32)
            assert unknown.value.code is ErrorCode.UNKNOWN_JOB and "submit it again" in unknown.value.message
        job_id = client.submit([object_view()], Options(ss_steps=50, texture_size=512))
        with pytest.raises(ProtocolError) as not_ready:
            client.fetch(job_id)
        assert not_ready.value.code is ErrorCode.NOT_READY
        client.cancel(job_id)


def raw_exchange(address: str, frames: list[bytes]) -> protocol.Message:
    """One request from a raw DEALER socket, bypassing the client's own validation like a broken client would."""
    context = zmq.Context.instance()
    dealer = context.socket(zmq.DEALER)
    dealer.linger = 0
    dealer.connect(address)
    try:
        dealer.send_multipart(frames)
        assert dealer.poll(5000), "the server did not answer"
        return protocol.decode(dealer.recv_multipart()).message
    finally:
        dealer.close()


def test_bad_inputs_get_their_error_code_and_the_server_keeps_serving(serve):
    server = serve()
    for case, (build, code) in BAD_INPUTS.items():
        reply = raw_exchange(server.address, build())
        assert isinstance(reply, ProtocolError) and reply.code is code, (case, reply)
    reply = raw_exchange(server.address, protocol.encode(protocol.JobList([]), "r"))
    assert reply.code is ErrorCode.BAD_REQUEST and "is a reply" in reply.message
    with client_for(server) as client:
        with pytest.raises(ProtocolError) as blank:
            client.submit([View(object_png(blank=True), camera_for(96, 64))], FAST)
        assert blank.value.code is ErrorCode.BAD_IMAGE and "blank" in blank.value.message
        with pytest.raises(ProtocolError) as unsupported:
            client.submit([object_view()], Options(resolution=512))
        assert unsupported.value.code is ErrorCode.UNSUPPORTED
        assert isinstance(run_to_result(client, client.submit([object_view()], FAST)), Result)


def test_a_resent_submit_is_one_job(serve):
    """Lazy Pirate resends a request whose reply was lost; the request id makes the resend harmless."""
    server = serve()
    frames = protocol.encode(protocol.SubmitRequest([object_view()], FAST), "resent-request")
    first, second = raw_exchange(server.address, frames), raw_exchange(server.address, frames)
    assert first.job_id == second.job_id
    with client_for(server) as client:
        assert sum(j.job_id == first.job_id for j in client.list_jobs()) == 1


def test_out_of_memory_is_reported_with_advice_and_the_server_keeps_serving(serve):
    server = serve(SilhouetteGenerator(out_of_memory_once=True))
    with client_for(server) as client:
        job_id = client.submit([object_view()], Options(resolution=1536, texture_size=512))
        with pytest.raises(ProtocolError) as oom:
            run_to_result(client, job_id)
        assert oom.value.code is ErrorCode.OUT_OF_MEMORY
        assert "low_vram" in oom.value.message and "resolution 1024" in oom.value.message
        assert client.status(job_id).state is JobState.FAILED
        assert isinstance(run_to_result(client, client.submit([object_view()], FAST)), Result)


def test_an_invalid_generator_result_is_an_internal_error_not_a_broken_import(serve):
    server = serve(NaNMeshGenerator())
    with client_for(server) as client:
        with pytest.raises(ProtocolError) as invalid:
            run_to_result(client, client.submit([object_view()], FAST))
        assert invalid.value.code is ErrorCode.INTERNAL and "invalid result" in invalid.value.message
        assert client.hello().model_id == "test-silhouette"


def test_finished_results_survive_a_server_restart(serve, tmp_path):
    first = serve()
    with client_for(first) as client:
        job_id = client.submit([object_view()], FAST)
        result = run_to_result(client, job_id)
    first.stop()
    second = serve()
    with client_for(second) as client:
        again = client.fetch(job_id)
        np.testing.assert_array_equal(again.faces, result.faces)
        assert again.maps == result.maps
        assert [j.state for j in client.list_jobs()] == [JobState.DONE]


def test_job_store_evicts_the_oldest_results_first(serve):
    server = serve(store_max_bytes=1)        # room for only the newest job
    with client_for(server) as client:
        old = client.submit([object_view()], FAST)
        run_to_result(client, old)          # fetched before the next job can finish and evict it
        new = client.submit([object_view()], FAST)
        run_to_result(client, new)
        with pytest.raises(ProtocolError) as evicted:
            client.fetch(old)
        assert evicted.value.code is ErrorCode.UNKNOWN_JOB
        assert client.fetch(new).job_id == new


def test_client_reports_a_missing_backend_quickly():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with client_for(f"tcp://127.0.0.1:{port}", timeout_s=1.0) as client:
        started = time.monotonic()
        with pytest.raises(BackendUnavailable, match="pixal3d serve"):
            client.hello()
        assert time.monotonic() - started < 1.5


# ---------------------------------------------------------------------------------------------------------
# Security
# ---------------------------------------------------------------------------------------------------------

def test_binding_beyond_loopback_needs_curve_keys(tmp_path):
    with pytest.raises(ValueError, match="pixal3d keys"):
        Server(SilhouetteGenerator(), bind="tcp://0.0.0.0:5557", store_dir=tmp_path)

    def must_not_load(args):
        raise AssertionError("the model must not be loaded before the bind is checked")
    assert serve_main(["--bind", "0.0.0.0", "--store-dir", str(tmp_path)], create_generator=must_not_load) == 2


def test_keys_command_writes_a_keypair_once(tmp_path, capsys):
    assert keys_main(["--dir", str(tmp_path)]) == 0
    public = read_key(tmp_path / "server.public").decode()
    assert public in capsys.readouterr().out
    assert keys_main(["--dir", str(tmp_path)]) == 1        # never overwrites a key in use
    assert read_key(tmp_path / "server.public").decode() == public


def test_curve_server_refuses_clients_without_its_key_and_serves_those_with_it(serve, tmp_path):
    public_path, secret_path = write_keypair(tmp_path / "keys")
    assert oct(secret_path.stat().st_mode & 0o777) == "0o600"
    server = serve(curve_secret_key=read_key(secret_path))
    with client_for(server, timeout_s=1.0) as stranger:
        with pytest.raises(BackendUnavailable, match="public key"):
            stranger.hello()
    wrong_public, _ = write_keypair(tmp_path / "other")
    with client_for(server, timeout_s=1.0, server_public_key=read_key(wrong_public)) as impostor:
        with pytest.raises(BackendUnavailable):
            impostor.hello()
    with client_for(server, server_public_key=public_path.read_text()) as trusted:
        assert trusted.hello().model_id == "test-silhouette"
        assert isinstance(run_to_result(trusted, trusted.submit([object_view()], FAST)), Result)


def test_allow_list_refuses_unknown_client_keys_clearly_and_serves_allowed_ones(serve, tmp_path):
    server_public, server_secret = write_keypair(tmp_path / "keys")
    allowed_dir = tmp_path / "allowed"
    write_keypair(allowed_dir, "laptop")
    laptop = (read_key(allowed_dir / "laptop.public"), read_key(allowed_dir / "laptop.secret"))
    server = serve(curve_secret_key=read_key(server_secret), client_keys_dir=allowed_dir)
    stranger_keys = tuple(k.decode() for k in zmq.curve_keypair())
    for keypair in (stranger_keys, None):       # a client key the server does not know, or none at all
        with client_for(server, server_public_key=read_key(server_public), client_keypair=keypair) as stranger:
            started = time.monotonic()
            with pytest.raises(AccessRefused, match="--client-keys") as refused:
                stranger.hello()
            assert time.monotonic() - started < 1.0          # told at once, not after the timeout
            if keypair is not None:
                assert stranger_keys[0] in str(refused.value)   # the key to allow
    with client_for(server, server_public_key=read_key(server_public), client_keypair=laptop) as trusted:
        assert trusted.hello().model_id == "test-silhouette"
        assert isinstance(run_to_result(trusted, trusted.submit([object_view()], FAST)), Result)
    with pytest.raises(ValueError, match="not the one of the client secret key"):
        Client(server.address, read_key(server_public), client_keypair=(laptop[0], stranger_keys[1]))
    # A key put in the folder is allowed from the next connection on, without a restart.
    (allowed_dir / "desktop.public").write_text(stranger_keys[0] + "\n")
    with client_for(server, server_public_key=read_key(server_public), client_keypair=stranger_keys) as admitted:
        assert admitted.hello().model_id == "test-silhouette"


def test_serve_checks_client_keys_before_loading_the_model(tmp_path):
    _, secret = write_keypair(tmp_path / "keys")
    (tmp_path / "empty").mkdir()

    def must_not_load(args):
        raise AssertionError("the model must not be loaded before the command line is checked")
    common = ["--store-dir", str(tmp_path / "store"), "--port", "0"]
    assert serve_main([*common, "--client-keys", str(tmp_path / "empty")], create_generator=must_not_load) == 2
    assert serve_main([*common, "--client-keys", str(tmp_path / "empty"), "--curve-secret-key", str(secret)],
                      create_generator=must_not_load) == 2
    with pytest.raises(ValueError, match="secret key"):
        Server(SilhouetteGenerator(), bind="tcp://127.0.0.1:*", store_dir=tmp_path, client_keys_dir=tmp_path / "keys")


def test_keys_command_makes_a_client_keypair(tmp_path, capsys):
    assert keys_main(["--client", "laptop", "--dir", str(tmp_path)]) == 0
    public = read_key(tmp_path / "laptop.public").decode()
    out = capsys.readouterr().out
    assert public in out and "--client-keys" in out
    assert oct((tmp_path / "laptop.secret").stat().st_mode & 0o777) == "0o600"
    assert zmq.curve_public(read_key(tmp_path / "laptop.secret")).decode() == public


# ---------------------------------------------------------------------------------------------------------
# A real `pixal3d serve` process
# ---------------------------------------------------------------------------------------------------------

def start_backend_process(store_dir: pathlib.Path, port: int = 0) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "backend"), os.environ.get("PYTHONPATH", "")]))
    process = subprocess.Popen([sys.executable, __file__, "--port", str(port), "--store-dir", str(store_dir)],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    line = process.stdout.readline()
    assert "listening on" in line, f"the backend did not start: {line!r}"
    return process, line.split()[-1]


def test_backend_killed_mid_job_is_reported_and_a_restart_serves_old_results(tmp_path):
    process, address = start_backend_process(tmp_path / "store")
    try:
        with Client(address, timeout_s=2.0, heartbeat_s=0.5) as client:
            finished = client.submit([object_view()], FAST)
            result = run_to_result(client, finished)
            doomed = client.submit([object_view()], Options(ss_steps=100, texture_size=512))
            wait_for(client, doomed, lambda s: s.state is JobState.RUNNING)
            process.send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            with pytest.raises(BackendUnavailable):
                for _ in client.events(doomed):
                    pass
            assert time.monotonic() - killed_at < 5.0
            process.wait()
            process, _ = start_backend_process(tmp_path / "store", port=int(address.rsplit(":", 1)[1]))
            np.testing.assert_array_equal(client.fetch(finished).positions, result.positions)
            with pytest.raises(ProtocolError) as lost:
                client.status(doomed)
            assert lost.value.code is ErrorCode.UNKNOWN_JOB
            assert isinstance(run_to_result(client, client.submit([object_view()], FAST)), Result)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        process.kill()


if __name__ == "__main__":
    sys.exit(serve_main(sys.argv[1:], create_generator=lambda args: SilhouetteGenerator(step_s=SLOW_STEP_S)))
