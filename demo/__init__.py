"""The all-in-one demo: a management daemon and simulated hosts in one process.

The only package that imports both ``hostdev.agent`` and ``hostdev.mgmt``.
"""

from __future__ import annotations
