"""The hostdev host agent: reports passthrough devices and drives libvirt."""

from __future__ import annotations
