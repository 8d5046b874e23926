"""Terminal output: a live bar on a terminal, plain lines everywhere else. (The rendering
alone, in process: tests/unit/test_progress.py.)"""

import os
import pty
import re
import subprocess
import sys

import pytest
from conftest import TESTS, run_dir_of

CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # anything but \t and \n
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # colours and cursor moves


def test_non_terminal_output_has_no_control_characters(cli, tiny_conf):
    done = cli("train", "tiny", "--config-dir", str(tiny_conf), check_rc=0)
    assert "step 8/8" in done.stdout
    assert not CONTROL.search(done.stdout), repr(done.stdout)
    assert not CONTROL.search(done.stderr), repr(done.stderr)
    log = (run_dir_of(done) / "train.log").read_text()
    assert "step 4/8" in log and not CONTROL.search(log)
    assert "progress " not in done.stdout + log


@pytest.mark.long
def test_terminal_gets_a_live_bar_and_the_log_stays_plain(tmp_path, cache_home):
    """Run under a pseudo-terminal: the bar is redrawn in place with \\r."""
    conf = TESTS / "conf"
    primary, replica = pty.openpty()
    env = {**os.environ, "XDG_CACHE_HOME": str(cache_home), "PYTHONPATH": str(TESTS / "fixtures"),
           "COLUMNS": "120"}
    process = subprocess.Popen(
        [sys.executable, "-m", "harness", "train", "hashy", "trainer.epochs=6",
         "--config-dir", str(conf), "--runs-dir", str(tmp_path / "runs")],
        stdin=replica, stdout=replica, stderr=replica, env=env, cwd=tmp_path)
    os.close(replica)
    chunks = []
    while True:
        try:
            chunk = os.read(primary, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    assert process.wait(timeout=300) == 0
    out = b"".join(chunks).decode()
    shown = ANSI.sub("", out)
    assert "\r\x1b[2K" in out  # redrawn in place
    assert re.search(r"step +\d+/96 ━+ epoch \d/6 loss \S+ \S+ steps/s ETA \d+:\d\d", shown)
    run_dir = next((tmp_path / "runs").iterdir())
    log = (run_dir / "train.log").read_text()
    assert "step 96/96" in log and not CONTROL.search(log) and "progress " not in log
