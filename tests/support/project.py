"""Where the source checkout's own files are, for tests that read them (docs, etc/, sql/)."""

from __future__ import annotations

from pathlib import Path
from typing import Final

#: The root of the source checkout (the folder holding pyproject.toml).
ROOT: Final = Path(__file__).resolve().parents[2]
