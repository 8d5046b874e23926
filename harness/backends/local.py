"""Train in a child process of the current Python environment."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from harness import rundir
from harness.backends.base import Backend, LaunchSpec
from harness.env import LAUNCHER_PID
from harness.progress import Console


class LocalHandle:
    def __init__(self, process: subprocess.Popen, log_path):
        self.process = process
        self.log_path = log_path

    def wait(self) -> int:
        with open(self.log_path, "a") as log:
            console = Console(log)
            for line in self.process.stdout:
                console.feed(line)
            console.close()
        return self.process.wait()

    def signal(self, signum: int) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signum)

    def stop(self, grace_s: float = 10.0) -> None:
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class LocalBackend(Backend):
    name = "local"

    def launch(self, spec: LaunchSpec) -> LocalHandle:
        command = [sys.executable, "-u", "-m", rundir.TRAINING_MODULE, str(spec.run_dir)]
        if spec.data_root:
            command += ["--data-root", str(spec.data_root)]
        command += list(spec.extra_args)
        # The pinned variables must be in the environment before the interpreter starts
        # (PYTHONHASHSEED is read only at interpreter start-up). LAUNCHER_PID: the
        # training stops (checkpoint, exit 75) when this launcher dies.
        env = {**os.environ, **spec.env, LAUNCHER_PID: str(os.getpid())}
        keep = (spec.lock_fd,) if spec.lock_fd is not None else ()
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, bufsize=1,
                                   pass_fds=keep)
        return LocalHandle(process, spec.run_dir / rundir.LOG)
