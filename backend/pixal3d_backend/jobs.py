"""The backend's jobs: a bounded queue of submitted requests, cooperative cancellation, and an on-disk store of
finished jobs that outlives the server process.

Job ids are random (uuid4 hex) and made here; the store only ever builds paths from ids that match
`protocol.JOB_ID_PATTERN`, never from anything else a client sent. Results are stored in the wire's frame
format (the frames `protocol.encode` makes, length-prefixed in one file), never pickled, and read back through
`protocol.decode`, so a damaged file is rejected like a bad message.
"""
from __future__ import annotations

import collections
import logging
import os
import shutil
import struct
import threading
import time
import uuid
from pathlib import Path

from . import protocol
from .protocol import ErrorCode, JobState, JobStatus, Progress, ProtocolError, Result, SubmitRequest

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"         # the job's final JobStatus, as the JSON header frame of a job_status message
RESULT_FILE = "result.frames"       # the result message's frames
FRAMES_MAGIC = b"PIXAL3D-FRAMES\x00\x01"
_COUNT = struct.Struct("<I")
_LENGTH = struct.Struct("<Q")


def new_job_id() -> str:
    return uuid.uuid4().hex


class Job:
    """A submitted request and its live state. The worker thread runs it; the server thread reads it."""

    def __init__(self, request: SubmitRequest):
        self.id = new_job_id()
        self.request = request
        self.submitted_at = time.time()
        self.state = JobState.QUEUED
        self.started_at: float | None = None
        self._stage, self._step, self._total = "starting", 0, 0
        self._cancel = threading.Event()

    def request_cancel(self) -> None:
        self._cancel.set()

    def should_cancel(self) -> bool:
        return self._cancel.is_set()

    def on_progress(self, stage: str, step: int, total: int) -> None:
        """Progress report from the generator. Also a cancellation point: raises CANCELLED once the job has
        been cancelled, so every progress report between sampler steps lets a cancel take effect."""
        self._stage, self._step, self._total = stage, step, total
        if self._cancel.is_set():
            raise ProtocolError(ErrorCode.CANCELLED, "the job was cancelled at the client's request")

    def status(self, queue_position: int | None = None) -> JobStatus:
        progress = None
        if self.started_at is not None:
            progress = Progress(self._stage, min(self._step, self._total), self._total,
                                time.time() - self.started_at)
        return JobStatus(self.id, self.state, self.submitted_at, queue_position, progress)


class JobQueue:
    """Jobs waiting (at most `capacity`) and running, plus access to finished ones in `store`. Thread-safe;
    `submit` never blocks: a full queue raises BUSY at once."""

    def __init__(self, capacity: int, store: "JobStore"):
        if capacity < 1:
            raise ValueError("the job queue needs room for at least one job")
        self.capacity = capacity
        self.store = store
        self._lock = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._running: Job | None = None

    def submit(self, request: SubmitRequest) -> tuple[Job, int]:
        """Queues `request`; returns the job and how many jobs are ahead of it."""
        with self._lock:
            if len(self._waiting) >= self.capacity:
                raise ProtocolError(ErrorCode.BUSY, f"the backend's queue is full ({self.capacity} jobs waiting); "
                                                    "retry in a few seconds")
            job = Job(request)
            self._waiting.append(job)
            self._lock.notify()
            return job, len(self._waiting) - 1 + (self._running is not None)

    def take(self, timeout_s: float) -> Job | None:
        """The next job, now marked running, or None after `timeout_s` with nothing queued (for the worker)."""
        with self._lock:
            if not self._lock.wait_for(lambda: len(self._waiting) > 0, timeout_s):
                return None
            job = self._waiting.popleft()
            job.state, job.started_at = JobState.RUNNING, time.time()
            self._running = job
            return job

    def complete(self, job: Job, result: Result | None = None, error: ProtocolError | None = None) -> None:
        """Ends the running `job` with its result or its error, writing it to the store before it leaves memory
        so that a status request always finds it in one place or the other."""
        if result is not None:
            state = JobState.DONE
        elif error is not None and error.code is ErrorCode.CANCELLED:
            state = JobState.CANCELLED
        else:
            state = JobState.FAILED
        final = JobStatus(job.id, state, job.submitted_at, None, job.status().progress, error)
        try:
            self.store.save(final, result)
        except OSError:
            # The job is lost (clients asking for it get UNKNOWN_JOB and resubmit); the server keeps serving.
            log.exception("job store: could not save job %s in %s", job.id, self.store.directory)
        with self._lock:
            job.state = state
            if self._running is job:
                self._running = None

    def cancel(self, job_id: str) -> JobState:
        """Cancels a waiting job at once; a running one stops at its next cancellation point (until then its
        state stays running). Finished jobs keep their state."""
        with self._lock:
            waiting = next((job for job in self._waiting if job.id == job_id), None)
            if waiting is not None:
                # Stored before it leaves the queue (the file is tiny), so it is never in neither place.
                self.store.save(JobStatus(job_id, JobState.CANCELLED, waiting.submitted_at, None, None,
                                          ProtocolError(ErrorCode.CANCELLED, "cancelled before it started")), None)
                self._waiting.remove(waiting)
                return JobState.CANCELLED
            if self._running is not None and self._running.id == job_id:
                self._running.request_cancel()
                return JobState.RUNNING
        return self.status(job_id).state

    def cancel_running(self) -> None:
        """Asks the running job, if any, to stop (used when the server shuts down)."""
        with self._lock:
            if self._running is not None:
                self._running.request_cancel()

    def status(self, job_id: str) -> JobStatus:
        with self._lock:
            for position, job in enumerate(self._waiting):
                if job.id == job_id:
                    return job.status(position + (self._running is not None))
            if self._running is not None and self._running.id == job_id:
                return self._running.status()
        stored = self.store.status(job_id)
        if stored is None:
            raise ProtocolError(ErrorCode.UNKNOWN_JOB, f"this backend has no job {job_id}: it may have been "
                                                       "waiting when the backend restarted, or been evicted from "
                                                       "the job store; submit it again")
        return stored

    def statuses(self) -> list[JobStatus]:
        """Running and waiting jobs first, then finished ones, newest first."""
        with self._lock:
            live = [] if self._running is None else [self._running.status()]
            ahead = len(live)
            live += [job.status(ahead + i) for i, job in enumerate(self._waiting)]
        live_ids = {status.job_id for status in live}
        finished = [s for s in self.store.statuses() if s.job_id not in live_ids]
        return (live + finished)[:protocol.MAX_LISTED_JOBS]

    def result(self, job_id: str) -> Result:
        """The finished job's result; its error if it failed or was cancelled; NOT_READY while it is not done."""
        status = self.status(job_id)
        if status.state is JobState.DONE:
            result = self.store.result(job_id)
            if result is not None:
                return result
            raise ProtocolError(ErrorCode.UNKNOWN_JOB, f"the result of job {job_id} was evicted from the job store; "
                                                       "submit it again")
        if status.error is not None:
            raise status.error
        raise ProtocolError(ErrorCode.NOT_READY, f"job {job_id} is {status.state.value}; fetch it once its status "
                                                 "is done")


class JobStore:
    """Finished jobs on disk, one directory per job id, using at most about `max_bytes` (the oldest finished jobs
    are evicted first; the newest is always kept)."""

    def __init__(self, directory: str | os.PathLike, max_bytes: int):
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.directory.mkdir(parents=True, exist_ok=True)
        for leftover in self.directory.glob(".partial-*"):     # a save interrupted by a crash
            shutil.rmtree(leftover, ignore_errors=True)

    def _job_dir(self, job_id: str) -> Path:
        if not protocol.JOB_ID_PATTERN.fullmatch(job_id):
            raise ValueError(f"not a job id: {job_id!r}")
        return self.directory / job_id

    def save(self, status: JobStatus, result: Result | None) -> None:
        """Writes the job atomically (a partial directory renamed into place), then evicts old jobs."""
        final = self._job_dir(status.job_id)
        partial = self.directory / f".partial-{status.job_id}"
        partial.mkdir()
        if result is not None:
            _write_frames(partial / RESULT_FILE, protocol.encode(result, ""))
        (partial / STATUS_FILE).write_bytes(protocol.encode(status, "")[0])
        os.replace(partial, final)
        self._evict(keep=final)

    def status(self, job_id: str) -> JobStatus | None:
        try:
            header = (self._job_dir(job_id) / STATUS_FILE).read_bytes()
            return protocol.decode([header]).message
        except FileNotFoundError:
            return None
        except ProtocolError as error:
            log.warning("job store: unreadable status of job %s: %s", job_id, error)
            return None

    def result(self, job_id: str) -> Result | None:
        try:
            return protocol.decode(_read_frames(self._job_dir(job_id) / RESULT_FILE)).message
        except FileNotFoundError:
            return None
        except ProtocolError as error:
            raise ProtocolError(ErrorCode.INTERNAL, f"the stored result of job {job_id} is damaged ({error.message}); "
                                                    "submit the job again") from None

    def statuses(self) -> list[JobStatus]:
        """Every stored job's status, newest first."""
        found = [status for _, path in self._jobs_oldest_first()[::-1]
                 if (status := self.status(path.name)) is not None]
        return found

    def _jobs_oldest_first(self) -> list[tuple[float, Path]]:
        jobs = []
        for path in self.directory.iterdir():
            if protocol.JOB_ID_PATTERN.fullmatch(path.name):
                try:
                    jobs.append(((path / STATUS_FILE).stat().st_mtime, path))
                except FileNotFoundError:       # evicted meanwhile
                    continue
        return sorted(jobs)

    def _evict(self, keep: Path) -> None:
        sizes = [(path, sum(f.stat().st_size for f in path.iterdir())) for _, path in self._jobs_oldest_first()]
        total = sum(size for _, size in sizes)
        for path, size in sizes:
            if total <= self.max_bytes:
                break
            if path != keep:
                shutil.rmtree(path, ignore_errors=True)
                total -= size
                log.info("job store: evicted job %s to stay under %d bytes", path.name, self.max_bytes)


def _write_frames(path: Path, frames: list[bytes]) -> None:
    with open(path, "wb") as file:
        file.write(FRAMES_MAGIC + _COUNT.pack(len(frames)))
        for frame in frames:
            file.write(_LENGTH.pack(len(frame)))
            file.write(frame)


def _read_frames(path: Path) -> list[bytes]:
    """Frames written by `_write_frames`; a malformed file raises ProtocolError like a malformed message."""
    data = path.read_bytes()
    damaged = ProtocolError(ErrorCode.BAD_REQUEST, f"{path.name} is not a complete frames file")
    start = len(FRAMES_MAGIC) + _COUNT.size
    if len(data) < start or not data.startswith(FRAMES_MAGIC):
        raise damaged
    (count,) = _COUNT.unpack_from(data, len(FRAMES_MAGIC))
    if count > protocol.MAX_FRAMES:
        raise damaged
    frames, pos = [], start
    for _ in range(count):
        if pos + _LENGTH.size > len(data):
            raise damaged
        (length,) = _LENGTH.unpack_from(data, pos)
        pos += _LENGTH.size
        if pos + length > len(data):
            raise damaged
        frames.append(data[pos:pos + length])
        pos += length
    if pos != len(data):
        raise damaged
    return frames
