"""A local backend started by the add-on as a child process. Pure Python (no bpy).

Starting never waits for the backend: the process loads its model in the background and the panel shows its
state; its output goes to a log file in the extension's user directory.
"""
from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path


class LocalBackend:
    def __init__(self):
        self._process: subprocess.Popen | None = None
        self.log_path: Path | None = None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def state(self) -> str:
        if self._process is None:
            return "Not started from Blender"
        code = self._process.poll()
        if code is None:
            return f"Running (process {self._process.pid})"
        return f"Exited with code {code}; see {self.log_path}"

    def start(self, command: str, log_path: Path) -> None:
        """Starts `command` (a shell-like command line, split without a shell)."""
        if self.running:
            raise RuntimeError("the local backend is already running")
        argv = shlex.split(command, posix=os.name != "nt")
        if not argv:
            raise ValueError("the backend command is empty: set it in the add-on preferences")
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        with open(log_path, "ab") as log:
            try:
                self._process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                                 stderr=subprocess.STDOUT, start_new_session=os.name != "nt")
            except OSError as error:
                raise ValueError(f"cannot run {argv[0]!r} ({error.strerror}); set the backend command in the "
                                 "add-on preferences to the full path of `pixal3d` (or `python -m "
                                 "pixal3d_backend.cli`) followed by `serve`") from None

    def stop(self) -> None:
        """Asks the backend to exit (SIGTERM); it finishes the current sampler step first."""
        if self.running:
            self._process.terminate()
