"""The choices a new run makes once, in the command that starts it, and records in
config.yaml: the image profile a config leaves to the machine, the device
`trainer.device=auto` means on it, and the seed a config leaves null.

harness/config/ composes and validates without asking the machine anything or drawing
randomness; the commands compose through `compose` here, so that each choice is made
once, before anything is written, and a replay or resume reads it back instead of
choosing again."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from harness import config
from harness.host import gpu
from harness.training import seeding


def compose(name: str, overrides: List[str], config_dir: Optional[Path] = None
            ) -> Dict[str, Any]:
    """A new run's config: composed (with this machine's image profile where the config
    names none), its device and seed chosen."""
    return choose(config.compose(name, overrides, config_dir,
                                 image_profile=gpu.image_profile))


def choose(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """trainer.device=auto decided for this machine and backend, saying why; a null seed
    drawn. A config that set both comes back as it was."""
    trainer = cfg.get("trainer")
    if trainer is not None and trainer["device"] == "auto":
        trainer["device"], why = gpu.choose_device(cfg)
        print(f"harness: trainer.device=auto chose {trainer['device']} ({why})",
              file=sys.stderr, flush=True)
    if cfg["seed"] is None:
        cfg["seed"] = seeding.draw_seed()
    return cfg
