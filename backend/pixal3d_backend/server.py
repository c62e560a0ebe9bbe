"""The warm backend server (`pixal3d serve`) and its CurveZMQ keys (`pixal3d keys`).

Two threads: the router thread owns the ZeroMQ ROUTER socket and answers every request at once from the job
queue and store (a full queue answers BUSY; nothing waits for the GPU); the worker thread runs one job at a time
through the generator, which keeps the model loaded between jobs.

A generator is any object with
    capabilities() -> dict with keys device, free_memory_bytes, model_id, model_hash, resolutions, max_views,
                      multiview and optionally default_options (the fields of protocol.Capabilities that describe
                      the model and its device)
    generate(request: protocol.SubmitRequest, on_progress(stage, step, total), should_cancel() -> bool)
        -> protocol.Result
`on_progress` raises ProtocolError(CANCELLED) once the job is cancelled, so reporting progress between sampler
steps is enough to make a generator cancellable; it may also raise ProtocolError itself (e.g. BAD_IMAGE).
A generator that can trade speed for GPU memory also has
    low_vram: bool, use_low_vram() -> None     (keep each model on the GPU only during its stage, from now on)
and then a job that runs out of GPU memory switches it to low-VRAM mode and runs once more; the result's
metadata `low_vram_retry` says why. A second out-of-memory error is the job's error, with advice.

Security: only loopback (or ipc) endpoints may be bound without a CurveZMQ secret key. With a key the socket is
a CURVE server, so only clients that know the server's public key can complete the handshake; others are
dropped before any message is read. With a folder of allowed client public keys as well (`--client-keys`), a ZAP
handler also refuses every client whose own key is not in that folder; the client is told it was refused.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import gc
import io
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import zmq
from zmq.auth.thread import ThreadAuthenticator

from . import __version__, protocol
from .jobs import Job, JobQueue, JobStore
from .protocol import (Accepted, Cancelled, CancelRequest, Capabilities, ErrorCode, FetchRequest, Hello, JobList,
                       ListJobsRequest, ProtocolError, Result, StatusRequest, SubmitRequest)

log = logging.getLogger(__name__)

DEFAULT_PORT = 5557
DEFAULT_BIND = f"tcp://127.0.0.1:{DEFAULT_PORT}"
DEFAULT_QUEUE_SIZE = 4
DEFAULT_STORE_BYTES = 4 << 30
REMEMBERED_SUBMISSIONS = 1024        # request ids whose reply may still be retried by a reconnecting client
POLL_INTERVAL_S = 0.1                # how often the threads look at the stop flag
LOOPBACK_HOSTS = ("localhost", "::1", "[::1]")
MAX_EXCEPTION_CHARS = 600            # of an exception's text quoted in an error message
LOW_VRAM_RETRY_STAGE = "low_vram_retry"     # the progress stage while a job starts again in low-VRAM mode


class Generator(Protocol):
    def capabilities(self) -> dict[str, Any]: ...

    def generate(self, request: SubmitRequest, on_progress: Callable[[str, int, int], None],
                 should_cancel: Callable[[], bool]) -> Result: ...


def default_store_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "pixal3d" / "jobs"


def is_local_endpoint(endpoint: str) -> bool:
    """Whether only this machine can reach `endpoint` (tcp on a loopback address, ipc or inproc)."""
    transport, _, rest = endpoint.partition("://")
    if transport in ("ipc", "inproc"):
        return True
    host = rest.rpartition(":")[0]
    return transport == "tcp" and (host.startswith("127.") or host in LOOPBACK_HOSTS)


def require_secure_bind(endpoint: str, curve_secret_key: bytes | None) -> None:
    if curve_secret_key is None and not is_local_endpoint(endpoint):
        raise ValueError(f"refusing to bind {endpoint} without CurveZMQ keys: other machines could send jobs and "
                         "read results. Create keys with `pixal3d keys`, start the server with "
                         "--curve-secret-key, and give the public key to the add-on; or bind 127.0.0.1 and use "
                         "an SSH tunnel")


class AllowedClientKeys:
    """The ZAP credentials provider of `--client-keys`: the client public keys in `directory`, one Z85 key per
    `*.public` file (as `pixal3d keys --client` writes them). Read at every handshake, so a key added to or
    removed from the folder takes effect without a restart."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        if not self.keys():
            raise ValueError(f"no client public keys in {self.directory}: put one `<name>.public` file per allowed "
                             "client there (`pixal3d keys --client <name>` makes a keypair; the Blender add-on "
                             "shows its own public key in its preferences)")

    def keys(self) -> set[bytes]:
        keys = set()
        for path in sorted(self.directory.glob("*.public")):
            try:
                keys.add(read_key(path))
            except (OSError, ValueError) as error:
                log.warning("client keys: skipping %s (%s)", path, error)
        return keys

    def callback(self, domain: str, client_key: bytes) -> bool:
        allowed = client_key in self.keys()
        if not allowed:
            log.warning("refused a client whose public key %s is not in %s", client_key.decode(), self.directory)
        return allowed


class Server:
    def __init__(self, generator: Generator, bind: str = DEFAULT_BIND, queue_size: int = DEFAULT_QUEUE_SIZE,
                 store_dir: str | os.PathLike | None = None, curve_secret_key: bytes | None = None,
                 store_max_bytes: int = DEFAULT_STORE_BYTES, client_keys_dir: str | os.PathLike | None = None):
        require_secure_bind(bind, curve_secret_key)
        if client_keys_dir is not None and curve_secret_key is None:
            raise ValueError("allowed client keys need CurveZMQ: give the server a secret key as well")
        self._allowed_clients = AllowedClientKeys(client_keys_dir) if client_keys_dir is not None else None
        self.generator = generator
        self.bind = bind
        self.queue = JobQueue(queue_size, JobStore(store_dir or default_store_dir(), store_max_bytes))
        self._curve_secret_key = curve_secret_key
        self._capabilities()            # a generator that describes itself wrongly fails here, not on first hello
        self._context = zmq.Context()
        self._socket: zmq.Socket | None = None
        self._authenticator: ThreadAuthenticator | None = None
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        # Request id -> reply, so a client that resends a submit whose reply it lost gets the same job.
        self._submissions: collections.OrderedDict[str, Accepted] = collections.OrderedDict()
        self.address: str | None = None

    # -- life cycle ------------------------------------------------------------------------------------

    def start(self) -> "Server":
        """Binds (`address` is then the actual endpoint, also for a port given as `*` or 0) and starts serving."""
        socket = self._context.socket(zmq.ROUTER)
        socket.linger = 0
        socket.setsockopt(zmq.MAXMSGSIZE, protocol.REQUEST_FRAME_CUTOFF_BYTES)
        if self._allowed_clients is not None:
            # The ZAP handler must run before the socket binds, or the first handshakes would skip it.
            self._authenticator = ThreadAuthenticator(self._context, log=log.getChild("zap"))
            self._authenticator.start()
            self._authenticator.configure_curve_callback("*", self._allowed_clients)
        if self._curve_secret_key is not None:
            socket.curve_secretkey = self._curve_secret_key
            socket.curve_publickey = zmq.curve_public(self._curve_secret_key)
            socket.curve_server = True
        socket.bind(self.bind)
        self.address = socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._socket = socket
        self._threads = [threading.Thread(target=self._route, name="pixal3d-router", daemon=True),
                         threading.Thread(target=self._work, name="pixal3d-worker", daemon=True)]
        for thread in self._threads:
            thread.start()
        log.info("serving %s on %s", self._capabilities().model_id, self.address)
        return self

    def stop(self) -> None:
        """Stops serving; a running job is cancelled at its next cancellation point. Finished jobs stay stored.
        Stopping twice is harmless."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self.queue.cancel_running()
        for thread in self._threads:
            thread.join(timeout=10.0)
        if self._authenticator is not None:
            self._authenticator.stop()
        self._context.term()

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- router thread ---------------------------------------------------------------------------------

    def _route(self) -> None:
        socket = self._socket
        poller = zmq.Poller()
        poller.register(socket, zmq.POLLIN)
        try:
            while not self._stopping.is_set():
                if poller.poll(POLL_INTERVAL_S * 1000):
                    identity, *frames = socket.recv_multipart()
                    socket.send_multipart([identity, *self._answer(frames)])
        finally:
            socket.close(linger=0)

    def _answer(self, frames: list[bytes]) -> list[bytes]:
        try:
            request_id, message = protocol.decode(frames)
        except ProtocolError as error:
            return protocol.encode(error, protocol.peek_request_id(frames))
        handler = self._handlers.get(type(message))
        try:
            if handler is None:
                raise ProtocolError(ErrorCode.BAD_REQUEST, f"'{message.TYPE}' is a reply; the backend answers "
                                                           f"{sorted(h.TYPE for h in self._handlers)}")
            reply = handler(self, request_id, message)
        except ProtocolError as error:
            reply = error
        except Exception:        # a bug must cost one reply, never the server
            log.exception("failed to answer a %s request", message.TYPE)
            reply = ProtocolError(ErrorCode.INTERNAL, "the backend failed to answer this request; its log has "
                                                      "the details")
        return protocol.encode(reply, request_id)

    def _capabilities(self) -> Capabilities:
        limits = {"queue_size": self.queue.capacity, "max_views": protocol.MAX_VIEWS,
                  "max_image_bytes": protocol.MAX_IMAGE_BYTES, "max_image_side": protocol.MAX_IMAGE_SIDE}
        return Capabilities(backend_version=__version__, protocol_version=protocol.PROTOCOL_VERSION,
                            limits=limits, **self.generator.capabilities())

    def _hello(self, request_id: str, hello: Hello) -> Capabilities:
        log.info("hello from %s", hello.client or "a client")
        return self._capabilities()

    def _submit(self, request_id: str, request: SubmitRequest) -> Accepted:
        if request_id and request_id in self._submissions:
            return self._submissions[request_id]
        request.check_supported(self._capabilities())
        for i, view in enumerate(request.views):
            check_image_pixels(view.image_png, f"views[{i}].image")
        job, ahead = self.queue.submit(request)
        accepted = Accepted(job.id, ahead)
        if request_id:
            self._submissions[request_id] = accepted
            if len(self._submissions) > REMEMBERED_SUBMISSIONS:
                self._submissions.popitem(last=False)
        log.info("job %s queued (%d view(s), %d ahead)", job.id, len(request.views), ahead)
        return accepted

    def _status(self, request_id: str, request: StatusRequest) -> protocol.JobStatus:
        return self.queue.status(request.job_id)

    def _list(self, request_id: str, request: ListJobsRequest) -> JobList:
        return JobList(self.queue.statuses())

    def _cancel(self, request_id: str, request: CancelRequest) -> Cancelled:
        return Cancelled(request.job_id, self.queue.cancel(request.job_id))

    def _fetch(self, request_id: str, request: FetchRequest) -> Result:
        return self.queue.result(request.job_id)

    _handlers = {Hello: _hello, SubmitRequest: _submit, StatusRequest: _status, ListJobsRequest: _list,
                 CancelRequest: _cancel, FetchRequest: _fetch}

    # -- worker thread ---------------------------------------------------------------------------------

    def _work(self) -> None:
        while not self._stopping.is_set():
            job = self.queue.take(POLL_INTERVAL_S)
            if job is not None:
                log.info("job %s running", job.id)
                self._run(job)
                log.info("job %s %s", job.id, job.state.value)

    def _run(self, job: Job) -> None:
        try:
            produced = self._generate(job)
        except ProtocolError as error:            # the generator's own verdict, CANCELLED included
            return self.queue.complete(job, error=error)
        except Exception as error:
            low_vram = job.request.options.low_vram or getattr(self.generator, "low_vram", False)
            return self.queue.complete(job, error=generation_error(error, job.request, low_vram))
        try:
            # Validated as the client will validate it, so a generator bug is reported here, not in Blender.
            result = protocol.check(dataclasses.replace(produced, job_id=job.id))
        except (ProtocolError, TypeError) as error:
            log.error("job %s: the generator returned an invalid result: %s", job.id, error)
            return self.queue.complete(job, error=ProtocolError(
                ErrorCode.INTERNAL, "the backend's generator returned an invalid result; its log has the details"))
        self.queue.complete(job, result=result)

    def _generate(self, job: Job) -> Result:
        """The generator's result for `job`. On running out of GPU memory, a generator that is not yet in low-VRAM
        mode switches to it for good (the next jobs would run out too) and the job runs once more."""
        try:
            return self.generator.generate(job.request, job.on_progress, job.should_cancel)
        except RuntimeError as error:
            if not (is_out_of_memory(error) and getattr(self.generator, "low_vram", True) is False):
                raise
            reason = f"{type(error).__name__}: {str(error)[:MAX_EXCEPTION_CHARS]}"
        # Past the except block the failed attempt's traceback, and with it its tensors, can be freed.
        self.generator.use_low_vram()
        _release_cached_memory()
        log.warning("job %s ran out of GPU memory (%s); running it again with the model in low-VRAM mode, which "
                    "stays on for the next jobs", job.id, reason)
        job.on_progress(LOW_VRAM_RETRY_STAGE, 0, 1)
        result = self.generator.generate(job.request, job.on_progress, job.should_cancel)
        return dataclasses.replace(result, metadata={**result.metadata, "low_vram_retry": reason})


def check_image_pixels(png: bytes, where: str) -> None:
    """Decodes an input PNG (its header is already validated) and rejects undecodable data or a blank mask."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(png)) as image:
            alpha = np.asarray(image.getchannel("A"))
    except Exception as error:     # Pillow reports broken data with many exception types
        raise ProtocolError(ErrorCode.BAD_IMAGE, f"{where} cannot be decoded ({type(error).__name__}: "
                                                 f"{str(error)[:MAX_EXCEPTION_CHARS]}); save it again as an 8-bit "
                                                 "RGBA PNG") from None
    protocol.check_mask(alpha, where)


def is_out_of_memory(error: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError is a RuntimeError saying 'out of memory', like other backends' OOM errors."""
    return isinstance(error, MemoryError) or (isinstance(error, RuntimeError) and "out of memory" in str(error))


def generation_error(error: Exception, request: SubmitRequest, low_vram: bool) -> ProtocolError:
    """The error a client sees for an exception raised by the generator (`low_vram`: whether the job ran in
    low-VRAM mode)."""
    text = str(error)[:MAX_EXCEPTION_CHARS]
    if not is_out_of_memory(error):
        log.error("generation failed", exc_info=error)
        return ProtocolError(ErrorCode.INTERNAL, f"generation failed ({type(error).__name__}: {text}); the backend "
                                                 "log has the details")
    _release_cached_memory()
    if low_vram:
        text += ", even in low-VRAM mode"
    advice = [] if low_vram else ["turn on low_vram"]
    if request.options.resolution > 1024:
        advice.append("use resolution 1024")
    if len(request.views) > 1:
        advice.append("send fewer views")
    advice.append("close other programs that use the GPU")
    return ProtocolError(ErrorCode.OUT_OF_MEMORY, f"the GPU ran out of memory ({text}); {', '.join(advice)}, "
                                                  "then generate again")


def _release_cached_memory() -> None:
    """Returns what the failed job held, so the next job (perhaps in low-VRAM mode) starts with a clean device."""
    gc.collect()
    torch = sys.modules.get("torch")     # only if the generator loaded it; the server itself never does
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------
# CurveZMQ keys
# ---------------------------------------------------------------------------------------------------------

def write_keypair(directory: str | os.PathLike, name: str = "server") -> tuple[Path, Path]:
    """Creates a CurveZMQ keypair as two Z85 text files, `<name>.public` and `<name>.secret` (owner-only).
    Returns their paths (public, secret)."""
    public, secret = zmq.curve_keypair()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    public_path, secret_path = directory / f"{name}.public", directory / f"{name}.secret"
    descriptor = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(secret + b"\n")
    public_path.write_bytes(public + b"\n")
    return public_path, secret_path


def read_key(path: str | os.PathLike) -> bytes:
    key = Path(path).read_bytes().strip()
    if len(key) != 40:
        raise ValueError(f"{path} does not hold a 40-character Z85 CurveZMQ key")
    return key


def keys_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pixal3d keys", description="Create a CurveZMQ keypair: the server's "
                                     "(needed to accept connections from other machines), or with --client one for "
                                     "a client that a server started with --client-keys lets in.")
    parser.add_argument("--dir", default=str(Path.home() / ".config" / "pixal3d"), help="where to write the keys")
    parser.add_argument("--name", help="file name of the keys (default: server, or the client's name)")
    parser.add_argument("--client", metavar="NAME", help="make a client keypair named NAME instead")
    args = parser.parse_args(argv)
    name = args.name or args.client or "server"
    try:
        public_path, secret_path = write_keypair(args.dir, name)
    except FileExistsError as error:
        print(f"pixal3d keys: {error.filename} exists; remove it or choose another --name", file=sys.stderr)
        return 1
    public = read_key(public_path).decode()
    if args.client:
        print(f"client secret key: {secret_path}  (keep it on the client's machine)")
        print(f"client public key: {public}  (copy {public_path} into the folder the server reads with "
              "--client-keys)")
    else:
        print(f"secret key: {secret_path}  (keep it private; start the server with --curve-secret-key {secret_path})")
        print(f"public key: {public}  (paste it into the add-on's preferences)")
    return 0


# ---------------------------------------------------------------------------------------------------------
# `pixal3d serve`
# ---------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pixal3d serve", description="Keep the model loaded and serve the "
                                     "Blender add-on over ZeroMQ.")
    parser.add_argument("--bind", default="127.0.0.1", help="address to listen on; anything but loopback "
                        "needs --curve-secret-key")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 picks a free port")
    parser.add_argument("--queue-size", type=int, default=DEFAULT_QUEUE_SIZE, help="jobs that may wait; more "
                        "are answered 'busy'")
    parser.add_argument("--store-dir", type=Path, default=default_store_dir(), help="finished jobs, kept "
                        "across restarts")
    parser.add_argument("--store-max-gb", type=float, default=DEFAULT_STORE_BYTES / (1 << 30))
    parser.add_argument("--curve-secret-key", type=Path, help="secret key file from `pixal3d keys`")
    parser.add_argument("--client-keys", type=Path, metavar="DIR", help="let in only the clients whose public keys "
                        "are in DIR (one `<name>.public` file each); needs --curve-secret-key")
    parser.add_argument("--model", help="model directory or id; default: the bundled default model")
    parser.add_argument("--device", help="torch device, e.g. cuda:0; default: the first GPU, else the CPU")
    parser.add_argument("--low-vram", action=argparse.BooleanOptionalAction, default=None,
                        help="keep models in host memory between stages (default: on for GPUs under "
                             "32 GiB; about 3 %% slower, a third of the VRAM)")
    parser.add_argument("--dinov3", help="local DINOv3 ViT-L/16 folder (official models; default: $PIXAL3D_DINOV3 "
                        "or the Hugging Face cache)")
    parser.add_argument("--naf", help="local naf_release.pth (official models; default: $PIXAL3D_NAF or the torch "
                        "hub cache)")
    return parser


def serve_main(argv: list[str], create_generator: Callable[[argparse.Namespace], Generator] | None = None) -> int:
    """`pixal3d serve`: runs until SIGINT or SIGTERM. `create_generator(args)` builds the generator; by default
    `pixal3d_backend.service.create_generator`, imported only here because it loads torch."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    host = f"[{args.bind}]" if ":" in args.bind else args.bind
    bind = f"tcp://{host}:{args.port or '*'}"
    try:        # everything that can be wrong with the command line fails before the slow model load
        secret = read_key(args.curve_secret_key) if args.curve_secret_key else None
        require_secure_bind(bind, secret)
        if args.client_keys is not None:
            if secret is None:
                raise ValueError("--client-keys needs --curve-secret-key: only CurveZMQ clients have keys")
            AllowedClientKeys(args.client_keys)
    except (OSError, ValueError) as error:
        print(f"pixal3d serve: {error}", file=sys.stderr)
        return 2
    if create_generator is None:
        from .service import create_generator
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())     # before "listening": a stop request may follow it at once
    server = Server(create_generator(args), bind=bind, queue_size=args.queue_size, store_dir=args.store_dir,
                    curve_secret_key=secret, store_max_bytes=int(args.store_max_gb * (1 << 30)),
                    client_keys_dir=args.client_keys).start()
    print(f"pixal3d backend listening on {server.address}", flush=True)
    try:
        while not stop.wait(0.5):     # a timed wait, so Ctrl+C gets through on every platform
            pass
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0
