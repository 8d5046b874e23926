"""benchmarks/results.json: each benchmark script records its section there."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results.json"


def save(section: str, result: dict) -> None:
    """Replace `section` of results.json with `result`, keeping the other sections."""
    merged = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    merged[section] = result
    RESULTS.write_text(json.dumps(merged, indent=2, sort_keys=True) + "\n")
