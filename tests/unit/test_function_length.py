"""Every function of the package fits on a screen: at most 60 lines, docstring included
(the longest were replay's and a command's run, before they were split by what they do)."""

import ast
from pathlib import Path

import harness

PACKAGE = Path(harness.__file__).parent
LIMIT = 60


def test_no_function_is_longer_than_the_limit():
    long = [f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}: "
            f"{node.end_lineno - node.lineno + 1} lines"
            for path in sorted(PACKAGE.rglob("*.py"))
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > LIMIT]
    assert not long, f"split these by what they do (at most {LIMIT} lines):\n" + "\n".join(long)
