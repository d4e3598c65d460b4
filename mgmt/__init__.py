"""The hostdev management daemon: inventory, allocation, placement and jobs."""

from __future__ import annotations
