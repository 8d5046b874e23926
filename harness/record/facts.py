"""`python -m harness.record.facts [DETERMINISM_JSON [RUN_DIR]]`: print, as JSON, the environment a
training process would record in its lockfile, captured the way training sees it; with
RUN_DIR also the weights digest of its model.pt (`run_weights_sha256`, for the integrity
check, harness/record/integrity.py, which then needs no torch of its own).

Replay runs this in a child process started exactly like the training process (same
interpreter, the pinned environment of the run's determinism settings, the settings applied
before reading them back), so the comparison with the lockfile is like for like, and the
parent process never imports torch: planning a replay stays fast. A capture is remembered
for an unchanged environment (harness/facts_cache.py), so a replay usually starts no child
at all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from harness.errors import EnvironmentProblem
from harness.record import facts_cache


def capture(det: Dict[str, Any]) -> Dict[str, Any]:
    """The lockfile sections describing this process's environment (run inside the child)."""
    from harness.record import lockfile
    from harness.training import determinism

    determinism.apply(det)
    return {
        "software": lockfile.capture_software(),
        "hardware": lockfile.capture_hardware(),
        "environment": lockfile.capture_environment(),
        "determinism": {"mode": det["mode"], "in_effect": determinism.audit()},
    }


def current(det: Dict[str, Any], run_dir: Optional[Path] = None,
            timeout_s: float = 300) -> Tuple[Dict[str, Any], Optional[str]]:
    """(this environment as a training process would record it, the cache key when it came
    from the cache). Without `run_dir`, a capture remembered for an unchanged environment is
    used; otherwise, and on a miss, the capture runs in a child started like a local
    training process (which also returns `run_weights_sha256` of `run_dir`'s model.pt)."""
    from harness.training.determinism import pinned_environment

    env = {**os.environ, **pinned_environment(det)}
    cache_key = facts_cache.key(det, env)
    if run_dir is None:
        known = facts_cache.lookup(cache_key)
        if known is not None:
            return known, cache_key
    facts = _child(det, env, run_dir, timeout_s)
    watched = facts.pop(facts_cache.WATCHED)
    facts_cache.remember(cache_key, {k: v for k, v in facts.items()
                                       if k != "run_weights_sha256"}, watched)
    return facts, None


def _child(det: Dict[str, Any], env: Dict[str, str], run_dir: Optional[Path],
           timeout_s: float) -> Dict[str, Any]:
    extra = [str(run_dir)] if run_dir is not None else []
    try:
        done = subprocess.run([sys.executable, "-m", "harness.record.facts", json.dumps(det),
                               *extra],
                              env=env, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EnvironmentProblem(f"could not capture the current environment ({exc}); check "
                                 f"that `{sys.executable} -m harness.record.facts` runs.") from None
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise EnvironmentProblem(f"capturing the current environment failed (exit "
                                 f"{done.returncode}):\n{tail}\nCheck that torch imports in "
                                 f"{sys.executable}.")
    return json.loads(done.stdout)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    det = json.loads(argv[0]) if argv else {"mode": "strict", "threads": 2}
    watched = facts_cache.watched_stamps()  # before the capture: see capture_cache
    facts = {**capture(det), facts_cache.WATCHED: watched}
    if len(argv) > 1:
        from harness.record import integrity

        facts["run_weights_sha256"] = integrity.weights_digest(Path(argv[1]))
    print(json.dumps(facts, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
