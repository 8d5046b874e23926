"""Terminal rendering (harness/progress.py): the image build's bar and the runs table."""

import re

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # colours and cursor moves


class _Terminal:
    """A text stream that says it is a terminal (rendering only; the real-terminal path is
    shown end to end in tests/test_progress.py)."""

    def __init__(self):
        self.text = ""

    def isatty(self):
        return True

    def write(self, text):
        self.text += text

    def flush(self):
        pass


def test_image_build_on_a_terminal_draws_one_bar():
    from harness.progress import BuildConsole

    term = _Terminal()
    console = BuildConsole(term)
    console.feed("Step 1/4 : FROM base\n ---> abc\nStep 2/4 : RUN pip install")
    console.feed(" torch\nCollecting torch\n")
    console.close()
    frames = [ANSI.sub("", f) for f in term.text.split("\r\x1b[2K")]
    assert re.search(r"^[━╺╸]+ build step 1/4: Step 1/4 : FROM base$", frames[0])
    assert re.search(r"^[━╺╸]+ build step 2/4: Collecting torch$", frames[-1].rstrip("\n"))
    assert ANSI.sub("", term.text).endswith("\n")  # the bar stays, the next line starts below


def test_runs_table_on_a_terminal_shows_whole_run_ids(tmp_path):
    from harness.progress import show_table

    term = _Terminal()
    run_id = "20261126T200958488046Z-fashion_mnist-9fab62"
    show_table([[run_id, "succeeded", "replayed: IDENTICAL x1"]], ["run", "status", "replay"],
               term)
    shown = ANSI.sub("", term.text)
    assert f"│ {run_id} │" in shown and "┃ run" in shown
    assert "\x1b[32mIDENTICAL" in term.text or "\x1b[32mreplayed: IDENTICAL" in term.text
