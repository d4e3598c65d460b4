"""Runs the demo (placeholder until the demo lands)."""

from __future__ import annotations

import argparse


def run_demo(args: argparse.Namespace) -> int:
    """Runs the demo and returns the exit status."""
    print("hostdev demo: not written yet")
    return 1
