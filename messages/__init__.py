"""The hostdev protocol: typed commands, answers, events and API requests."""

from __future__ import annotations
