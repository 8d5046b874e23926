"""Imported by Python at start-up in every process of a `harness run` command.

`harness run` puts this file's directory first on PYTHONPATH (the mechanism
`opentelemetry-instrument` uses), so Python's `site` module imports it before the user's
first line. It seeds and pins the process (harness.script.injection.pinning) and then runs the
sitecustomize it shadows, if there is one. Opt out per run with `command.inject=false`;
`HARNESS_INJECT=0` in a process's environment turns it off for that process alone.
"""

import importlib.machinery
import importlib.util
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))


def _harness_injection():
    if importlib.util.find_spec("harness") is None and os.environ.get("HARNESS_SRC"):
        # An interpreter other than the harness's own: find the package where it lives.
        sys.path.append(os.environ["HARNESS_SRC"])
    import harness.script.injection.pinning

    return harness.script.injection.pinning


def _chain_shadowed_sitecustomize():
    path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", path)
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


if os.environ.get("HARNESS_INJECT") == "1" and os.environ.get("HARNESS_RUN_DIR"):
    _harness_injection().install()
_chain_shadowed_sitecustomize()
