"""The running job as the main thread sees it: starts the worker, and a `bpy.app.timers` callback drains the
worker's events (bounded time per tick), updates the panel and the window's progress bar, and imports the
result with an undo step of its own. Nothing here blocks on the network."""
from __future__ import annotations

import dataclasses
import json
import threading
import time
from dataclasses import dataclass, field

import bpy
import numpy as np

from . import backend_process, importer, worker

TICK_S = 0.1                 # timer interval while a job runs
TICK_BUDGET_S = 0.02         # event handling per tick; the import of a finished result is the one exception

local_backend = backend_process.LocalBackend()


@dataclass
class Target:
    """Where a result goes and what it records: captured when the job starts."""
    scene_name: str
    camera_world: np.ndarray            # source camera (view 0) at capture time, without scale
    camera_name: str | None             # the source camera object; None for image sources
    name: str                           # of the new object
    parent_to_camera: bool
    provenance: dict = field(default_factory=dict)
    create_camera: dict | None = None   # image sources: lens/shift/resolution of a camera to create


@dataclass
class Session:
    worker: worker.JobWorker
    target: Target
    started: float = field(default_factory=time.monotonic)
    last_tick_s: float = 0.0            # measured duration of the latest timer tick


current: Session | None = None
_check: tuple[threading.Thread, list] | None = None
_check_text = ""


def busy() -> bool:
    return current is not None


def start(job: worker.Job, target: Target) -> None:
    global current
    if current is not None:
        raise RuntimeError("a Pixal3D job is already running")
    current = Session(worker.JobWorker(job), target)
    status = bpy.context.window_manager.pixal3d
    status.running, status.cancelling, status.stage, status.step, status.total = True, False, "", 0, 0
    status.fraction = 0.0
    status.message, status.last_error = "Connecting to the backend…", ""
    current.worker.start()
    _progress_begin()
    if not bpy.app.timers.is_registered(tick):
        bpy.app.timers.register(tick, first_interval=TICK_S)


def cancel() -> None:
    if current is not None:
        current.worker.cancel()
        status = bpy.context.window_manager.pixal3d
        status.cancelling, status.message = True, "Cancelling…"


def tick() -> float | None:
    """The timer callback. Returns the next interval, or None once the job is over."""
    session = current
    if session is None:
        return None
    began = time.perf_counter()
    try:
        for event in worker.drain(session.worker.events, TICK_BUDGET_S):
            if _apply(session, event):
                return None
        _redraw()
        return TICK_S
    finally:
        session.last_tick_s = time.perf_counter() - began


def _apply(session: Session, event) -> bool:
    """Applies one event; True when the job is over."""
    status = bpy.context.window_manager.pixal3d
    if isinstance(event, worker.Connected):
        caps = event.capabilities
        status.backend = f"{caps.model_id} on {caps.device}"
        status.model_options = json.dumps(caps.default_options)
        status.message = "Submitting…"
    elif isinstance(event, worker.Queued):
        status.message = "Waiting in the backend's queue" + (f" ({event.queue_position} ahead)"
                                                             if event.queue_position else "")
    elif isinstance(event, worker.Waiting):
        status.message = event.message
    elif isinstance(event, worker.Progress):
        status.stage, status.step, status.total = event.stage, event.step, event.total
        status.fraction = event.step / event.total if event.total else 0.0
        status.message = f"{event.stage.replace('_', ' ').capitalize()} {event.step}/{event.total}"
        _progress_update(status.fraction)
    elif isinstance(event, worker.Finished):
        _finish()
        try:
            obj = _import(session.target, event)
        except Exception as error:   # keep the scene usable and say what happened
            status.last_error = f"Importing the result failed: {error}"
            _report({'ERROR'}, status.last_error)
        else:
            status.message = f"Imported {obj.name}"
        return True
    elif isinstance(event, worker.Failed):
        _finish()
        status.message, status.last_error = "", event.message
        _report({'ERROR'}, event.message)
        return True
    elif isinstance(event, worker.Cancelled):
        _finish()
        status.message = "Cancelled"
        return True
    return False


def _import(target: Target, finished: worker.Finished):
    scene = bpy.data.scenes.get(target.scene_name) or bpy.context.scene
    parent = bpy.data.objects.get(target.camera_name) if target.camera_name and target.parent_to_camera else None
    camera_world = target.camera_world
    if target.create_camera is not None:
        camera_world = _photo_camera_world(target.camera_world, finished.placement)
    provenance = dict(target.provenance)
    result = finished.result
    provenance.update(job_id=result.job_id, seed=result.metadata.get("seed", provenance.get("seed")),
                      model_id=finished.capabilities.model_id, model_hash=finished.capabilities.model_hash,
                      backend_version=finished.capabilities.backend_version, input_hashes=finished.input_hashes,
                      options_sent=dataclasses.asdict(finished.options), metadata=result.metadata)
    obj = importer.import_result(finished, target.name, scene.collection, camera_world, provenance, parent)
    if target.create_camera is not None:
        cam = _create_photo_camera(scene, target, camera_world)
        obj["pixal3d"]["camera"] = cam.name
    if scene == bpy.context.scene:
        for other in bpy.context.view_layer.objects:
            other.select_set(False)
        obj.select_set(True)
        bpy.context.view_layer.objects.active = obj
    bpy.ops.ed.undo_push(message=f"Pixal3D: import {obj.name}")
    return obj


def _photo_camera_world(cursor_frame: np.ndarray, placement) -> np.ndarray:
    """Image sources: a camera looking along +Y (Blender's front view) placed so the object lands on the 3D
    cursor, whose location is the translation of `cursor_frame`."""
    world = np.array(cursor_frame, dtype=np.float64)
    world[:3, 3] = world[:3, 3] - world[:3, :3] @ placement.object_in_camera[:3, 3]
    return world


def _create_photo_camera(scene, target: Target, camera_world: np.ndarray):
    from mathutils import Matrix
    spec = target.create_camera
    data = bpy.data.cameras.new(f"{target.name} camera")
    data.sensor_fit, data.sensor_width, data.lens = 'AUTO', 36.0, spec["lens"]
    cam = bpy.data.objects.new(data.name, data)
    cam.matrix_world = Matrix(camera_world.tolist())
    cam["pixal3d_resolution"] = spec["resolution"]
    scene.collection.objects.link(cam)
    return cam


def _finish() -> None:
    global current
    current = None
    status = bpy.context.window_manager.pixal3d
    status.running = status.cancelling = False
    bpy.context.window_manager.progress_end()
    _redraw()


def _progress_begin() -> None:
    bpy.context.window_manager.progress_begin(0.0, 1.0)


def _progress_update(fraction: float) -> None:
    bpy.context.window_manager.progress_update(fraction)


def _redraw() -> None:
    for window in bpy.context.window_manager.windows:
        for area in window.screen.areas:
            if area.type in {'VIEW_3D', 'PREFERENCES'}:
                area.tag_redraw()


def _report(level: set, message: str) -> None:
    """Reports from a timer have no operator: a tiny one shows the message in the status bar and the Info log."""
    windows = bpy.context.window_manager.windows
    if not windows:
        print(f"Pixal3D: {message}")
        return
    with bpy.context.temp_override(window=windows[0]):
        try:
            bpy.ops.pixal3d.report(level=next(iter(level)), message=message)
        except RuntimeError:
            pass    # an ERROR report reaches the status bar and Info log and is also raised to Python callers


# -- connection check (preferences and panel) -----------------------------------------------------------------

def check_connection(connection: worker.Connection) -> None:
    """Asks the backend for its capabilities in a thread; `status_text()` shows the answer."""
    global _check, _check_text
    if _check is not None:
        return
    answer: list = []

    def ask():
        try:
            with connection.client() as c:
                caps = c.hello()
            answer.append((f"Connected: {caps.model_id} on {caps.device} (backend {caps.backend_version})",
                           caps.default_options))
        except Exception as error:
            answer.append((f"Not connected: {error}", None))

    thread = threading.Thread(target=ask, name="pixal3d-check", daemon=True)
    _check, _check_text = (thread, answer), "Checking…"
    thread.start()
    bpy.app.timers.register(_check_tick, first_interval=TICK_S)


def _check_tick() -> float | None:
    global _check, _check_text
    if _check is None:
        return None
    thread, answer = _check
    if thread.is_alive():
        return TICK_S
    (_check_text, model_options), _check = answer[0], None
    if model_options is not None:
        bpy.context.window_manager.pixal3d.model_options = json.dumps(model_options)
    _redraw()
    return None


def status_text() -> str:
    return _check_text


def shutdown() -> None:
    """Unregister: cancel the job (the worker is a daemon thread and exits with its next poll) and stop the
    local backend this session started."""
    global current
    if current is not None:
        current.worker.cancel()
        current = None
    for timer in (tick, _check_tick):
        if bpy.app.timers.is_registered(timer):
            bpy.app.timers.unregister(timer)
    local_backend.stop()
