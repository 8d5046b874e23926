"""Terminal output of a run. The training process prints plain lines; the launcher decides
how they look:

- attached to a terminal: `step` and `progress` lines become one live bar (step, epoch,
  loss, steps/s, ETA), drawn by rich, other lines scroll above it;
- otherwise (CI logs, Slurm logs, pipes): the plain lines, unchanged, no control characters.

`progress` lines are frequent (the launcher asks for them through HARNESS_PROGRESS_S only
when it has a terminal) and never reach train.log; `step` lines (every trainer.log_every
steps) always do."""

from __future__ import annotations

import re
import shutil
import sys
from typing import IO, List, Optional

STEP_LINE = re.compile(
    r"^(?:step|progress) (?P<step>\d+)/(?P<total>\d+) epoch (?P<epoch>\d+)/(?P<epochs>\d+) "
    r"loss (?P<loss>\S+) (?P<rate>\S+) steps/s ETA (?P<eta>\d+)s")


def live_interval(stream: IO = sys.stdout) -> Optional[str]:
    """How often the training should report progress: only for a terminal."""
    return "0.5" if stream.isatty() else None


def rich_console(out: IO[str]):
    """A rich console drawing on `out` (a terminal), as wide as the terminal."""
    from rich.console import Console as RichConsole

    return RichConsole(file=out, force_terminal=True, highlight=False, soft_wrap=True,
                       width=shutil.get_terminal_size((100, 20)).columns)


def training_bar(out: IO[str]):
    """rich's live bar for a run: the training's own step, epoch, loss, rate and ETA."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    return Progress(TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(),
                    TextColumn("epoch {task.fields[epoch]}"),
                    TextColumn("loss [cyan]{task.fields[loss]}"),
                    TextColumn("{task.fields[rate]} steps/s"),
                    TextColumn("ETA {task.fields[eta]}"),
                    console=rich_console(out), auto_refresh=False)


class Console:
    """Feeds a run's output lines to the terminal (bar or plain) and to its log file."""

    def __init__(self, log: IO[str], out: IO[str] = sys.stdout):
        self.log = log
        self.out = out
        self.live = out.isatty()
        self.bar = None  # rich's Progress, once the first step line came
        self.task = None
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
            self.draw(match)
        elif line.startswith("progress "):
            return
        elif self.bar is not None:
            self.bar.console.print(line, markup=False)  # above the bar
        else:
            self.out.write(line + "\n")
            self.out.flush()

    def draw(self, match: re.Match) -> None:
        eta = int(match["eta"])
        fields = {"epoch": f"{match['epoch']}/{match['epochs']}", "loss": match["loss"],
                  "rate": match["rate"], "eta": f"{eta // 60}:{eta % 60:02d}"}
        if self.bar is None:
            self.bar = training_bar(self.out)
            self.task = self.bar.add_task("train", total=int(match["total"]), **fields)
            self.bar.start()
        self.bar.update(self.task, completed=int(match["step"]), **fields)
        self.bar.refresh()

    def close(self) -> None:
        if self.partial:
            self.line(self.partial)
            self.partial = ""
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


BUILD_STEP = re.compile(r"^Step (?P<step>\d+)/(?P<total>\d+) : (?P<what>.*)")


class BuildConsole:
    """Image build output: on a terminal one rich bar (build step N/M and the latest output
    line, redrawn in place); elsewhere the builder's lines unchanged."""

    def __init__(self, out: IO[str] = sys.stderr):
        self.out = out
        self.live = out.isatty()
        self.partial = ""
        self.step: Optional[re.Match] = None
        self.bar = None
        self.task = None

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
            self.draw(int(self.step["step"]), int(self.step["total"]), line.strip())

    def draw(self, step: int, total: int, latest: str) -> None:
        from rich.progress import BarColumn, Progress, TextColumn

        if self.bar is None:
            self.bar = Progress(BarColumn(bar_width=20),
                                TextColumn("build step {task.completed}/{task.total}:"),
                                TextColumn("{task.description}", markup=False),
                                console=rich_console(self.out), auto_refresh=False)
            self.task = self.bar.add_task(latest, total=total, completed=step)
            self.bar.start()
        self.bar.update(self.task, completed=step, total=total, description=latest)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def table(rows: List[List[str]], header: List[str]) -> str:
    """Plain aligned columns under a header and a rule of dashes."""
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*map(str, r)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def show_table(rows: List[List[str]], header: List[str], out: IO[str] = sys.stdout) -> None:
    """A table: drawn by rich on a terminal, plain aligned columns elsewhere."""
    if not out.isatty():
        out.write(table(rows, header) + "\n")
        return
    from rich.table import Table
    from rich.text import Text

    drawn = Table(header_style="bold")
    # The first column names the row (a run id to copy): shown whole; the others fold.
    drawn.add_column(header[0], no_wrap=True, min_width=max(len(str(r[0])) for r in rows))
    for name in header[1:]:
        drawn.add_column(name, overflow="fold")
    for row in rows:
        drawn.add_row(*(Text(str(cell), style=_style(str(cell))) for cell in row))
    rich_console(out).print(drawn)


def _style(cell: str) -> str:
    for words, style in ((("DIVERGED", "failed", "FAIL"), "red"),
                         (("IDENTICAL", "succeeded"), "green"),
                         (("preempted", "running", "queued"), "yellow")):
        if any(word in cell for word in words):
            return style
    return ""
