"""What both daemons run on that is not protocol: properties files, logging, metrics, sd_notify."""

from __future__ import annotations
