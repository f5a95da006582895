"""barlow: self-supervised visual representation learning by redundancy reduction."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
