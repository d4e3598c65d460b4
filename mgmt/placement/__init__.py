"""Placement: which host fits a VM, and why the others do not."""
