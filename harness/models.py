"""`harness.models.SmallCNN`: the public path configs name (`model._target_`). The models
live in harness/training/models.py."""

from harness.training.models import SmallCNN

__all__ = ["SmallCNN"]
