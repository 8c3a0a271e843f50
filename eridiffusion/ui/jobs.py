"""Training and sampling run as child processes of the server, never inside it.

`TrainJob` starts `python -m eridiffusion.cli train CONFIG [overrides] [--resume DIR]` in its
own session (a Ctrl-C or a crash of the UI does not reach it) with its output in
`OUTPUT_DIR/ui-train.log`; `stop()` sends SIGINT, on which the trainer finishes the step,
saves the state and exits 130. `SampleJob` runs `python -m eridiffusion.cli sample ...` in a
worker thread and reports the PNGs it wrote.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from eridiffusion.errors import UserError
from eridiffusion.ui.paths import Root
from eridiffusion.ui.runs import LOG_NAME

CLI = [sys.executable, "-m", "eridiffusion.cli"]


class Busy(UserError):
    """A training run is already going; one at a time."""


def _child_setup() -> None:
    """In the child before exec: SIGINT back to default (a server started in the background
    ignores it, and an ignored SIGINT stays ignored in the trainer, so stop would do nothing)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


class TrainJob:
    """The one training child process of the server, and the folder it writes."""

    def __init__(self, root: Root):
        self.root = root
        self.proc: subprocess.Popen | None = None
        self.folder: Path | None = None
        self.started = 0.0
        self.command: list[str] = []
        self.stops = 0

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def since(self) -> float:
        """Files of the folder older than this belong to an earlier run (0 when resuming: they are this run's)."""
        return 0.0 if "--resume" in self.command else self.started - 1

    def start(self, config: Path, folder: Path, args: list[str]) -> dict:
        """Start `eri train CONFIG *args` writing `folder` (its log goes to folder/ui-train.log)."""
        if self.running:
            raise Busy(f"a run is going in {self.root.relative(self.folder)}: stop it first")
        folder.mkdir(parents=True, exist_ok=True)
        self.command = [*CLI, "train", str(config), *args]
        with open(folder / LOG_NAME, "ab") as log:  # appended: a resumed run's log follows the first
            log.write(f"\n$ eri train {' '.join(self.command[4:])}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.command, cwd=self.root.path, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=_env(), start_new_session=True, preexec_fn=_child_setup,
            )  # fmt: skip
        self.folder, self.started, self.stops = folder, time.time(), 0
        return self.status()

    def stop(self) -> dict:
        """SIGINT: the trainer saves its state after this step and exits 130 (a second one stops at once)."""
        if self.running:
            self.proc.send_signal(signal.SIGINT)
            self.stops += 1
        return self.status()

    def wait(self, timeout: float | None = None) -> int | None:
        return None if self.proc is None else self.proc.wait(timeout)

    def status(self) -> dict:
        code = None if self.proc is None else self.proc.poll()
        state = "idle" if self.proc is None else "running" if code is None else {0: "finished", 130: "stopped"}.get(
            code, "failed")  # fmt: skip
        if state == "running" and self.stops:
            state = "stopping"
        return {
            "state": state,
            "exit_code": code,
            "pid": None if self.proc is None else self.proc.pid,
            "dir": None if self.folder is None else self.root.relative(self.folder),
            "started": self.started,
            "command": " ".join(["eri", *self.command[3:]]),
        }


class SampleJob:
    """One `eri sample` child process run from a worker thread."""

    _ids = itertools.count(1)

    def __init__(self, root: Root, args: list[str], out: Path):
        self.id = next(self._ids)
        self.root, self.args, self.out = root, args, out
        self.state, self.files, self.error, self.log = "running", [], None, ""
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        done = subprocess.run([*CLI, "sample", *self.args, "--out", str(self.out)], cwd=self.root.path,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, env=_env())  # fmt: skip
        self.log = (done.stdout + done.stderr)[-4000:]
        wrote = [line.removeprefix("wrote ").strip() for line in done.stdout.splitlines() if line.startswith("wrote ")]
        self.files = [self.root.relative(self.root.path / p) for p in wrote]
        if done.returncode:
            self.state = "failed"
            self.error = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        else:
            self.state = "done"

    def status(self) -> dict:
        from eridiffusion.pipeline import read_params

        files = []
        for f in self.files if self.state == "done" else []:
            try:
                params = read_params(self.root.resolve(f)).to_json()
            except UserError:
                params = {}
            files.append({"path": f, "params": params})
        return {"id": self.id, "state": self.state, "files": files, "error": self.error, "log": self.log}
