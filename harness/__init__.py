"""harness: reproducible PyTorch training with lockfiles and bit-for-bit replay."""

__version__ = "0.1.0"
