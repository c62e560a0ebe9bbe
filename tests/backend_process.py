"""A real `pixal3d serve` process with the bundled default model, for the tests that need the real pipeline."""
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 240.0        # loading the default model: ~15 s alone, more while the machine is busy


def start_serve(store_dir: Path, log_path: Path, port: int = 0, extra_args: Sequence[str] = ()
                ) -> tuple[subprocess.Popen, str]:
    """`pixal3d serve` with the bundled default model on `port` (0: a free one) of 127.0.0.1, plus `extra_args`;
    returns (process, address) once it listens. Its log (stderr) goes to `log_path`."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "backend"), os.environ.get("PYTHONPATH", "")]))
    log = open(log_path, "w")
    process = subprocess.Popen([sys.executable, "-m", "pixal3d_backend.cli", "serve", "--bind", "127.0.0.1",
                                "--port", str(port), "--store-dir", str(store_dir), "--device", "cpu", *extra_args],
                               stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    log.close()
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 1.0)
        if ready:
            line = process.stdout.readline()
            if "listening on" in line:
                return process, line.split()[-1]
        if process.poll() is not None:
            break
    process.kill()
    process.wait()
    raise AssertionError(f"`pixal3d serve` did not start (exit code {process.returncode}); its log:\n"
                         + log_path.read_text()[-3000:])


def stop_serve(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
