"""The generation worker: a thread that owns the backend client for one job. Pure Python (no bpy).

The main thread hands it a `Job` and reads `events` (a `queue.Queue`) from a timer; the worker never touches
Blender data. Everything slow happens here: PNG encoding of the input, every network call, and the
preparation of the result's mesh arrays, so the main thread only copies ready arrays into Blender.
"""
from __future__ import annotations

import dataclasses
import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from . import imaging, meshdata
from .shared import client as backend_client
from .shared import protocol

# Options.resolution 0 asks for the loaded model's own resolution (256 for the bundled default model; the official
# weights run 1024 and 1536).
MODEL_DEFAULT_RESOLUTION = 0

BUSY_RETRY_S = 2.0


@dataclass
class ViewInput:
    """One input view as read on the main thread: either ready PNG bytes or Blender float pixels."""
    camera: protocol.Camera
    png: bytes | None = None
    pixels: np.ndarray | None = None     # Image.pixels, float RGBA rows bottom-up
    linear: bool = False                 # pixels are scene-linear (float images)

    def encode(self) -> bytes:
        if self.png is not None:
            return self.png
        rgba = imaging.rgba8_from_blender_pixels(self.pixels, self.camera.width, self.camera.height, self.linear)
        return imaging.encode_png_rgba(rgba)


@dataclass(frozen=True)
class Connection:
    """How to reach the backend, as set in the preferences."""
    address: str
    timeout_s: float = backend_client.DEFAULT_TIMEOUT_S
    server_public_key: str | None = None             # CurveZMQ, for a remote backend
    client_keypair: tuple[str, str] | None = None    # this Blender's own (public, secret), for an allow-list

    def client(self) -> backend_client.Client:
        return backend_client.Client(self.address, self.server_public_key, timeout_s=self.timeout_s,
                                     name="pixal3d blender add-on", client_keypair=self.client_keypair)


@dataclass
class Job:
    connection: Connection
    views: list[ViewInput]
    options: protocol.Options
    depth: float = 0.0       # distance of the object's centre from the camera; 0 keeps the model's own
    model_defaults: bool = False     # the options the loaded model suggests replace those in `options`


def resolved_options(options: protocol.Options, capabilities: protocol.Capabilities,
                     model_defaults: bool) -> protocol.Options:
    """The options to submit: a "Model Default" resolution becomes the model's, and with `model_defaults` every
    other option the model suggests (the bundled CPU model: sampler steps, face target, texture size, remesh,
    normal map; the official weights suggest none) is the model's too. The rest stays as the panel has it."""
    suggested = dict(capabilities.default_options)
    resolution = suggested.pop("resolution", capabilities.resolutions[0])
    changes = suggested if model_defaults else {}
    if options.resolution == MODEL_DEFAULT_RESOLUTION:
        changes["resolution"] = resolution
    return dataclasses.replace(options, **changes)


# -- events, read by the main thread -------------------------------------------------------------------------

@dataclass(frozen=True)
class Connected:
    capabilities: protocol.Capabilities


@dataclass(frozen=True)
class Queued:
    job_id: str
    queue_position: int


@dataclass(frozen=True)
class Progress:
    stage: str
    step: int
    total: int
    elapsed_s: float


@dataclass(frozen=True)
class Waiting:
    """Not running yet: the backend is busy, or the job waits in its queue."""
    message: str


@dataclass(frozen=True)
class Finished:
    result: protocol.Result
    mesh: meshdata.MeshArrays
    placement: meshdata.Placement
    capabilities: protocol.Capabilities
    options: protocol.Options                    # as submitted (`resolved_options`)
    input_hashes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Failed:
    message: str


@dataclass(frozen=True)
class Cancelled:
    pass


class JobWorker(threading.Thread):
    """Runs one job to its end; `cancel()` may be called from any thread."""

    def __init__(self, job: Job):
        super().__init__(name="pixal3d-job", daemon=True)
        self.job = job
        self.events: queue.Queue = queue.Queue()
        self._cancel = threading.Event()
        self.job_id: str | None = None

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelling(self) -> bool:
        return self._cancel.is_set()

    def run(self) -> None:
        try:
            with self.job.connection.client() as client:
                self.events.put(self._run(client))
        except backend_client.AccessRefused as error:
            self.events.put(Failed(f"Refused by the Pixal3D backend: {error}"))
        except backend_client.BackendUnavailable as error:
            self.events.put(Failed(f"Cannot reach the Pixal3D backend: {error}"))
        except protocol.ProtocolError as error:
            self.events.put(Failed(_explain(error)))
        except ValueError as error:      # a malformed key, a bad depth
            self.events.put(Failed(str(error)))
        except Exception as error:       # a bug: say so instead of leaving the panel stuck
            self.events.put(Failed(f"Unexpected error in the Pixal3D add-on ({type(error).__name__}: {error}); "
                                   "please report it with the system console output"))

    def _run(self, client: backend_client.Client):
        capabilities = client.hello()
        self.events.put(Connected(capabilities))
        pngs = [view.encode() for view in self.job.views]
        options = resolved_options(self.job.options, capabilities, self.job.model_defaults)
        request = protocol.SubmitRequest([protocol.View(png, view.camera) for png, view in zip(pngs, self.job.views)],
                                         options)
        request.check_supported(capabilities)
        resubmitted = False
        while True:
            job_id = self._submit(client, request)
            if job_id is None:
                return Cancelled()
            try:
                result = self._follow(client, job_id)
            except protocol.ProtocolError as error:
                if error.code is protocol.ErrorCode.UNKNOWN_JOB and not resubmitted:
                    # The backend restarted before finishing the job: submit it once more.
                    resubmitted = True
                    self.events.put(Waiting("The backend restarted; submitting the job again"))
                    continue
                if error.code is protocol.ErrorCode.CANCELLED:
                    return Cancelled()
                raise
            if result is None:
                return Cancelled()
            placement = meshdata.Placement.from_result(result.glb_to_camera, self.job.depth)
            mesh = meshdata.prepare_mesh(result.positions, result.faces, result.uvs, result.normals,
                                         placement.mesh_matrix)
            return Finished(result, mesh, placement, capabilities, options, [imaging.content_hash(p) for p in pngs])

    def _submit(self, client: backend_client.Client, request: protocol.SubmitRequest) -> str | None:
        while not self._cancel.is_set():
            try:
                self.job_id = client.submit(request.views, request.options)
                return self.job_id
            except backend_client.Busy:
                self.events.put(Waiting("The backend's queue is full; retrying"))
                self._cancel.wait(BUSY_RETRY_S)
        return None

    def _follow(self, client: backend_client.Client, job_id: str) -> protocol.Result | None:
        cancel_sent = False
        while True:
            if self._cancel.is_set() and not cancel_sent:
                client.cancel(job_id)
                cancel_sent = True
            update = client.poll(job_id)
            if isinstance(update, protocol.Result):
                return None if cancel_sent else update
            if update.state is protocol.JobState.QUEUED:
                self.events.put(Queued(job_id, update.queue_position or 0))
            elif update.progress is not None:
                p = update.progress
                self.events.put(Progress(p.stage, p.step, p.total, p.elapsed_s))
            self._cancel.wait(client.heartbeat_s)


def _explain(error: protocol.ProtocolError) -> str:
    if error.code is protocol.ErrorCode.OUT_OF_MEMORY:
        return f"The backend ran out of GPU memory: {error.message}. Try a lower resolution or texture size."
    if error.code is protocol.ErrorCode.VERSION_MISMATCH:
        return f"The add-on and the backend are different releases: {error.message}"
    return f"The backend refused the job ({error.code.value}): {error.message}"


def drain(events: queue.Queue, budget_s: float):
    """Yields queued events until the queue is empty or `budget_s` has passed (checked between events)."""
    deadline = time.perf_counter() + budget_s
    while time.perf_counter() < deadline:
        try:
            yield events.get_nowait()
        except queue.Empty:
            return
