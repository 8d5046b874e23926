"""The host side of the process boundary never imports torch: planning a replay, listing
runs and diffing locks stay quick (importing torch takes about 3 s here), and a host
without a working torch can still inspect runs. Only the training process's modules may
import it at module level; everything else imports it inside the functions that train,
digest weights or capture the environment."""

import json
import subprocess
import sys

from conftest import ROOT, TESTS

# The modules of the training process (python -m harness.train and what it runs), with the
# public paths that re-export them.
TRAINING_PROCESS = {"harness.training.loop", "harness.training.runtime", "harness.script.runner",
                    "harness.training.models", "harness.train", "harness.runtime",
                    "harness.models"}


def host_modules():
    names = []
    for path in sorted((ROOT / "harness").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] in ("__init__", "__main__") or "bootstrap" in parts:
            continue
        names.append(".".join(parts))
    return [name for name in names if name not in TRAINING_PROCESS]


def first_to_import_torch(modules, then=""):
    code = ("import importlib, json, sys\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name)\n"
            "    if 'torch' in sys.modules:\n"
            "        print(json.dumps(name)); raise SystemExit(0)\n"
            f"{then}\n"
            "print(json.dumps('torch' in sys.modules and 'after the calls' or None))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_no_host_module_imports_torch():
    modules = host_modules()
    assert len(modules) > 40 and "harness.commands.replay" in modules and "harness.cli" in modules
    assert first_to_import_torch(modules) is None
    # The control: the check sees a module that does import it.
    assert first_to_import_torch(["harness.config", "harness.train"]) == "harness.train"


def test_listing_runs_diffing_locks_and_planning_a_replay_start_without_torch(tmp_path):
    golden = [lock.parent for lock in
              sorted((TESTS / "golden" / "machines").glob("*/runs/*/*/harness.lock"))[:2]]
    calls = ("from harness import cli\n"
             f"assert cli.main(['runs', '--runs-dir', {str(tmp_path)!r}]) == 0\n"
             f"assert cli.main(['lock', 'diff', {str(golden[0])!r}, {str(golden[1])!r}]) "
             f"in (0, 1)\n"
             # a replay's first steps: the lock against the run's files, its signature and
             # trust, its config validated
             "from harness.commands import replay\n"
             f"run_dir, lock, cfg = replay.load_original({str(golden[0])!r}, None, trust=True)\n"
             "assert lock['run_id'] == run_dir.name and cfg['seed'] is not None\n")
    assert first_to_import_torch(["harness.cli"], then=calls) is None
