"""The backend's ZeroMQ client: used by the Blender add-on's worker thread and by the CLI.

Pure Python + pyzmq + `protocol` (no torch, no bpy); `build_addon.py` ships it inside the extension.

Every call is one request and one reply over a DEALER socket, made reliable with the ZeroMQ guide's
"Lazy Pirate" pattern: a request that gets no reply within its share of `timeout_s` is resent on a fresh socket
(a resent submit is recognised by its request id, so it never creates a second job), and when every attempt is
unanswered the call raises `BackendUnavailable`. Waiting for a job polls its status every `heartbeat_s`; those
polls are the heartbeat, so a backend that dies mid-job is noticed within `heartbeat_s + timeout_s`.

With CurveZMQ, a socket monitor watches the handshake: a backend that refuses this client's key (its
`--client-keys` allow-list) is reported at once as `AccessRefused`, naming the key to allow.
"""
from __future__ import annotations

import time
import uuid
from typing import Iterable, Iterator

import zmq
from zmq.utils.monitor import recv_monitor_message

from . import protocol
from .protocol import (Accepted, Cancelled, CancelRequest, Capabilities, ErrorCode, FetchRequest, Hello, JobList,
                       JobState, JobStatus, ListJobsRequest, Options, ProtocolError, Result, StatusRequest,
                       SubmitRequest, View)

DEFAULT_ADDRESS = "tcp://127.0.0.1:5557"
DEFAULT_TIMEOUT_S = 4.0
DEFAULT_HEARTBEAT_S = 0.5
ATTEMPTS = 2            # sends per request, each on a fresh socket with an equal share of the timeout


class BackendUnavailable(Exception):
    """No reply from the backend: it is not running, unreachable, or refused the CurveZMQ handshake."""


class AccessRefused(BackendUnavailable):
    """The backend completed the CurveZMQ handshake but does not allow this client's public key."""


class Busy(ProtocolError):
    """The backend's queue is full; submitting again after a few seconds will work."""


class Client:
    """A connection to one backend. Not thread-safe: ZeroMQ sockets belong to the thread that uses them, so one
    thread (the add-on's worker) owns the client.

    `server_public_key` (Z85, from `pixal3d keys`) turns on CurveZMQ: the client only talks to the server holding
    the matching secret key. It identifies itself with `client_keypair` (public, secret; Z85), which a server
    with an allow-list must know, or else with a keypair made for this connection.
    """

    def __init__(self, address: str = DEFAULT_ADDRESS, server_public_key: bytes | str | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, heartbeat_s: float = DEFAULT_HEARTBEAT_S,
                 name: str = "pixal3d client", client_keypair: tuple[bytes | str, bytes | str] | None = None):
        if timeout_s <= 0 or heartbeat_s <= 0:
            raise ValueError("timeout_s and heartbeat_s must be positive")
        if client_keypair is not None and server_public_key is None:
            raise ValueError("a client key is only used with CurveZMQ: enter the server's public key as well")
        self.address, self.timeout_s, self.heartbeat_s, self.name = address, timeout_s, heartbeat_s, name
        self._server_key = _z85_key(server_public_key) if server_public_key is not None else None
        if client_keypair is not None:
            self._keypair = (_z85_key(client_keypair[0]), _z85_key(client_keypair[1], "secret"))
            if zmq.curve_public(self._keypair[1]) != self._keypair[0]:
                raise ValueError("the client public key is not the one of the client secret key: create a new "
                                 "client key, or enter both halves of the same one")
        else:
            self._keypair = zmq.curve_keypair() if self._server_key is not None else None
        self._context = zmq.Context()
        self._socket: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None         # the CurveZMQ handshake's events

    # -- requests --------------------------------------------------------------------------------------

    def hello(self) -> Capabilities:
        return self._request(Hello(self.name), Capabilities)

    def submit(self, views: Iterable[View], options: Options | None = None) -> str:
        """Queues a job and returns its id. Raises Busy when the queue is full (retry later), ProtocolError for
        a request the backend cannot run (checked here first where possible), BackendUnavailable."""
        return self._request(SubmitRequest(list(views), options or Options()), Accepted).job_id

    def status(self, job_id: str) -> JobStatus:
        return self._request(StatusRequest(job_id), JobStatus)

    def list_jobs(self) -> list[JobStatus]:
        return self._request(ListJobsRequest(), JobList).jobs

    def cancel(self, job_id: str) -> JobState:
        """Cancels the job; returns its state (running until it reaches its next cancellation point)."""
        return self._request(CancelRequest(job_id), Cancelled).state

    def fetch(self, job_id: str) -> Result:
        """The result of a finished job, also after a reconnect or a backend restart."""
        return self._request(FetchRequest(job_id), Result)

    def poll(self, job_id: str, timeout_s: float = 0.0) -> JobStatus | Result:
        """The job's result if it finishes within `timeout_s`, else its latest status (state, queue position,
        progress). Raises the job's ProtocolError if it failed or was cancelled (code CANCELLED), and
        UNKNOWN_JOB if the backend restarted before finishing it (submit again)."""
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.status(job_id)
            if status.state is JobState.DONE:
                return self.fetch(job_id)
            if status.error is not None:
                raise ProtocolError(status.error.code, status.error.message)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return status
            time.sleep(min(self.heartbeat_s, remaining))

    def events(self, job_id: str) -> Iterator[JobStatus | Result]:
        """Status updates every `heartbeat_s` while the job waits or runs, then its Result. The caller may make
        other calls (e.g. `cancel`) between updates. Raises like `poll`."""
        while True:
            update = self.poll(job_id)
            yield update
            if isinstance(update, Result):
                return
            time.sleep(self.heartbeat_s)

    def close(self) -> None:
        self._reset()
        self._context.term()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- Lazy Pirate -----------------------------------------------------------------------------------

    def _request(self, message: protocol.Message, reply_type: type):
        request_id = uuid.uuid4().hex
        frames = protocol.encode(message, request_id)
        protocol.decode(frames)          # send only what the backend will accept; raises ProtocolError here
        for _ in range(ATTEMPTS):
            reply = self._exchange(frames, request_id, self.timeout_s / ATTEMPTS)
            if reply is not None:
                break
            self._reset()               # a fresh socket drops whatever the lost connection still had queued
        else:
            raise BackendUnavailable(self._unavailable_message())
        if isinstance(reply, ProtocolError):
            raise Busy(reply.code, reply.message) if reply.code is ErrorCode.BUSY else reply
        if not isinstance(reply, reply_type):
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"the backend answered a '{message.TYPE}' request with "
                                                       f"'{reply.TYPE}'")
        return reply

    def _exchange(self, frames: list[bytes], request_id: str, timeout_s: float) -> protocol.Message | None:
        """Sends `frames` and returns the reply to `request_id`, or None when none came within `timeout_s`."""
        socket = self._socket or self._connect()
        try:
            socket.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.Again:
            return None
        poller = zmq.Poller()
        poller.register(socket, zmq.POLLIN)
        if self._monitor is not None:
            poller.register(self._monitor, zmq.POLLIN)
        deadline = time.monotonic() + timeout_s
        while (remaining := deadline - time.monotonic()) > 0:
            ready = dict(poller.poll(remaining * 1000))
            if not ready:
                return None
            if self._monitor in ready:
                self._check_handshake()
            if socket in ready:
                reply_id, reply = protocol.decode(socket.recv_multipart())
                if reply_id == request_id:
                    return reply
                # Otherwise a late reply to an attempt already given up on: skip it.
        return None

    def _check_handshake(self) -> None:
        """Raises AccessRefused if the monitor reports that the server's ZAP handler refused our key."""
        event = recv_monitor_message(self._monitor)
        if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            self._reset()
            raise AccessRefused(f"the backend at {self.address} does not allow this client: its public key "
                                f"{self._keypair[0].decode()} is not among the backend's allowed client keys. Ask "
                                "whoever runs the backend to put it in a `<name>.public` file in its --client-keys "
                                "folder, or use a client key it already allows")

    def _connect(self) -> zmq.Socket:
        socket = self._context.socket(zmq.DEALER)
        socket.linger = 0
        socket.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_FRAME_BYTES)
        if self._keypair is not None:
            socket.curve_serverkey = self._server_key
            socket.curve_publickey, socket.curve_secretkey = self._keypair
            self._monitor = socket.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        socket.connect(self.address)
        self._socket = socket
        return socket

    def _reset(self) -> None:
        if self._monitor is not None:
            self._socket.disable_monitor()
            self._monitor.close(linger=0)
            self._monitor = None
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    def _unavailable_message(self) -> str:
        hint = ("check that the server public key in the preferences is the one `pixal3d keys` printed for this "
                "backend" if self._server_key is not None else
                "if the backend was started with --curve-secret-key, enter its public key in the preferences")
        return (f"no answer from the Pixal3D backend at {self.address} within {self.timeout_s:g} s: is it running "
                f"(`pixal3d serve`) and reachable? If it is, {hint}")


def new_keypair() -> tuple[str, str]:
    """A fresh CurveZMQ keypair (public, secret) as Z85 text, for a client that a backend's allow-list will name."""
    public, secret = zmq.curve_keypair()
    return public.decode("ascii"), secret.decode("ascii")


def _z85_key(key: bytes | str, kind: str = "public") -> bytes:
    key = (key.encode("ascii") if isinstance(key, str) else bytes(key)).strip()
    if len(key) != 40:
        raise ValueError(f"a CurveZMQ {kind} key is 40 Z85 characters (as `pixal3d keys` writes it)")
    return key
