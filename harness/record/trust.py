"""Trust before someone else's code. A run directory names code that replaying or resuming
it runs: every `_target_` of its config (imported, then called), and a command with its
files. One copied from a colleague or downloaded with a paper must not run that code
unasked. So a replay or resume of a run that no trusted key signed (harness/record/signing.py)
lists that code and stops (exit 6) before importing any of it, unless the user said
--trust.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from harness.config.targets import targets_of
from harness.errors import ReplayRefused
from harness.record.signing import Signature


def refuse_untrusted(run_name: str, signature: Signature, cfg: Dict[str, Any],
                     script: Optional[Dict[str, Any]], action: str, trusted: bool) -> None:
    """Refuse `action` ("replay", "resume") of an untrusted run unless `trusted`."""
    if signature.trusted:
        return
    if trusted:
        print(f"harness: --trust: {action} of {run_name}, {signature.describe()}", flush=True)
        return
    raise ReplayRefused(
        f"{action} of {run_name} refused: it is {signature.describe()}, so it was not made "
        f"by you or by anyone you trust, and its {action} runs its code:\n  "
        + "\n  ".join(code_of(cfg, script) or ["(no _target_ or command)"]) +
        f"\nRead these, then {action} with --trust; or, if you trust whoever signed it, add "
        f"their public key with `harness keys trust 'ed25519 ...'`.")


def code_of(cfg: Dict[str, Any], script: Optional[Dict[str, Any]]) -> List[str]:
    """What running a config executes, one line each: its `_target_`s, a command and the
    command's files."""
    code = [f"_target_ {value} (at {where})" for where, value in targets_of(cfg)]
    script = script or {}
    if script.get("argv"):
        code.append(f"the command `{' '.join(script['argv'])}` in {script.get('workdir')}")
    code += [f"its file {name}" for name in script.get("command_files") or []]
    return code
