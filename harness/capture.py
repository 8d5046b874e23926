"""`python -m harness.capture [DETERMINISM_JSON [RUN_DIR]]`: print, as JSON, the environment a
training process would record in its lockfile, captured the way training sees it; with
RUN_DIR also the weights digest of its model.pt (`run_weights_sha256`, for the integrity
check, harness/integrity.py, which then needs no torch of its own).

Replay runs this in a child process started exactly like the training process (same
interpreter, the pinned environment of the run's determinism settings, the settings applied
before reading them back), so the comparison with the lockfile is like for like, and the
parent process never imports torch: planning a replay stays fast.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Optional

from harness.errors import EnvironmentProblem


def capture(det: Dict[str, Any]) -> Dict[str, Any]:
    """The lockfile sections describing this process's environment (run inside the child)."""
    from harness import determinism, lockfile

    determinism.apply(det)
    return {
        "software": lockfile.capture_software(),
        "hardware": lockfile.capture_hardware(),
        "environment": lockfile.capture_environment(),
        "determinism": {"mode": det["mode"], "in_effect": determinism.audit()},
    }


def current(det: Dict[str, Any], run_dir: Optional[Path] = None,
            timeout_s: float = 300) -> Dict[str, Any]:
    """Run the capture in a child started like a local training process; return its JSON
    (with `run_weights_sha256` of `run_dir`'s model.pt when one is given)."""
    from harness.determinism import pinned_environment

    env = {**os.environ, **pinned_environment(det)}
    extra = [str(run_dir)] if run_dir is not None else []
    try:
        done = subprocess.run([sys.executable, "-m", "harness.capture", json.dumps(det),
                               *extra],
                              env=env, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EnvironmentProblem(f"could not capture the current environment ({exc}); check "
                                 f"that `{sys.executable} -m harness.capture` runs.") from None
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise EnvironmentProblem(f"capturing the current environment failed (exit "
                                 f"{done.returncode}):\n{tail}\nCheck that torch imports in "
                                 f"{sys.executable}.")
    return json.loads(done.stdout)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    det = json.loads(argv[0]) if argv else {"mode": "strict", "threads": 2}
    facts = capture(det)
    if len(argv) > 1:
        from harness import integrity

        facts["run_weights_sha256"] = integrity.weights_digest(Path(argv[1]))
    print(json.dumps(facts, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
