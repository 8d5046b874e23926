"""Terminal output of a run. The training process prints plain lines; the launcher decides
how they look:

- attached to a terminal: `step` and `progress` lines become one live bar (step, epoch,
  loss, steps/s, ETA) redrawn in place, other lines scroll above it;
- otherwise (CI logs, Slurm logs, pipes): the plain lines, unchanged, no control characters.

`progress` lines are frequent (the launcher asks for them through HARNESS_PROGRESS_S only
when it has a terminal) and never reach train.log; `step` lines (every trainer.log_every
steps) always do."""

from __future__ import annotations

import re
import shutil
import sys
from typing import IO, Optional

INTERVAL_ENV = "HARNESS_PROGRESS_S"  # seconds between `progress` lines; unset: none
STEP_LINE = re.compile(
    r"^(?:step|progress) (?P<step>\d+)/(?P<total>\d+) epoch (?P<epoch>\d+)/(?P<epochs>\d+) "
    r"loss (?P<loss>\S+) (?P<rate>\S+) steps/s ETA (?P<eta>\d+)s")


def live_interval(stream: IO = sys.stdout) -> Optional[str]:
    """How often the training should report progress: only for a terminal."""
    return "0.5" if stream.isatty() else None


def bar(match: re.Match, width: int) -> str:
    step, total = int(match["step"]), int(match["total"])
    eta = int(match["eta"])
    text = (f" {step}/{total} epoch {match['epoch']}/{match['epochs']} loss {match['loss']} "
            f"{match['rate']} steps/s ETA {eta // 60}:{eta % 60:02d}")
    room = max(10, min(40, width - len(text) - 3))
    filled = room * step // max(total, 1)
    return f"[{'#' * filled}{'.' * (room - filled)}]{text}"[: width - 1]


class Console:
    """Feeds a run's output lines to the terminal (bar or plain) and to its log file."""

    def __init__(self, log: IO[str], out: IO[str] = sys.stdout):
        self.log = log
        self.out = out
        self.live = out.isatty()
        self.bar_shown = False
        self.partial = ""

    def feed(self, text: str) -> None:
        """Accept any chunk of output; complete lines are handled as they arrive."""
        self.partial += text
        *lines, self.partial = self.partial.split("\n")
        for line in lines:
            self.line(line)

    def line(self, line: str) -> None:
        if not line.startswith("progress "):
            self.log.write(line + "\n")
            self.log.flush()
        match = STEP_LINE.match(line)
        if self.live and match:
            width = shutil.get_terminal_size((100, 20)).columns
            self.out.write("\r\x1b[2K" + bar(match, width))
            self.bar_shown = True
        elif not line.startswith("progress "):
            if self.bar_shown:
                self.out.write("\r\x1b[2K")
                self.bar_shown = False
            self.out.write(line + "\n")
        self.out.flush()

    def close(self) -> None:
        if self.partial:
            self.line(self.partial)
            self.partial = ""
        if self.bar_shown:
            self.out.write("\n")
            self.out.flush()
            self.bar_shown = False


BUILD_STEP = re.compile(r"^Step (?P<step>\d+)/(?P<total>\d+) : (?P<what>.*)")


class BuildConsole:
    """Image build output: on a terminal one bar (`build step N/M` and the latest output
    line, redrawn in place); elsewhere the builder's lines unchanged."""

    def __init__(self, out: IO[str] = sys.stderr):
        self.out = out
        self.live = out.isatty()
        self.partial = ""
        self.step: Optional[re.Match] = None

    def feed(self, text: str) -> None:
        if not self.live:
            self.out.write(text)
            self.out.flush()
            return
        self.partial += text
        *lines, self.partial = self.partial.split("\n")
        for line in lines:
            self.step = BUILD_STEP.match(line) or self.step
            if self.step is None or not line.strip():
                continue
            step, total = int(self.step["step"]), int(self.step["total"])
            filled = 20 * step // max(total, 1)
            width = shutil.get_terminal_size((100, 20)).columns
            text = f"[{'#' * filled}{'.' * (20 - filled)}] build step {step}/{total}: {line.strip()}"
            self.out.write("\r\x1b[2K" + text[: width - 1])
            self.out.flush()

    def close(self) -> None:
        if self.live and self.step is not None:
            self.out.write("\n")
            self.out.flush()
