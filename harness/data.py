"""`harness.data.IdxClassification`: the public path configs name (`data.dataset._target_`).
The datasets live in harness/training/datasets.py."""

from harness.training.datasets import IdxClassification

__all__ = ["IdxClassification"]
