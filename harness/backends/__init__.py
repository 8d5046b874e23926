"""Backends start the training process somewhere and hand back a handle to wait on or
stop. They share one small interface (see base.py); `get` picks one by name."""

from harness.backends.base import Backend, Handle, LaunchSpec
from harness.errors import ConfigError

NAMES = ("local",)


def get(name: str) -> Backend:
    if name == "local":
        from harness.backends.local import LocalBackend

        return LocalBackend()
    raise ConfigError(f"unknown backend '{name}'; valid backends: {', '.join(NAMES)}")


__all__ = ["Backend", "Handle", "LaunchSpec", "get", "NAMES"]
