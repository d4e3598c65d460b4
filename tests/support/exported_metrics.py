"""The metric names the daemons export (read from their registries) and those a query uses.

``exported_metric_names`` imports every module of both daemons and the
protocol (so every metric they define at import time is registered in
prometheus-client's default registry; the daemons import some modules only
when they start), adds management's inventory collector run on a migrated
SQLite file, and expands each family to the sample names Prometheus stores
(a counter ``x`` is scraped as ``x_total``, a histogram as ``x_bucket``,
``x_count`` and ``x_sum``).
"""

from __future__ import annotations

import importlib
import pkgutil
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Final

from prometheus_client import REGISTRY
from prometheus_client.metrics_core import Metric

from hostdev.mgmt.metrics import InventoryCollector
from hostdev.mgmt.persistence.database import create_database_engine
from tests.support.databases import sqlite_database

#: The packages whose modules the daemons run.
DAEMON_PACKAGES: Final = ("hostdev.messages", "hostdev.mgmt", "hostdev.agent")
#: Series Prometheus itself writes for every target.
PROMETHEUS_SERIES: Final = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})
_SUFFIXES: Final = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"),
                    "summary": ("_count", "_sum", ""), "gauge": ("",), "info": ("_info",)}
_PROMQL_WORDS: Final = frozenset({
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
    "unless", "offset", "inf", "nan", "le"})


def _sample_names(families: Iterable[Metric]) -> set[str]:
    names: set[str] = set()
    for family in families:
        names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",)))
    return names


def exported_metric_names() -> set[str]:
    """Returns every series name either daemon's ``/metrics`` can serve."""
    for package in DAEMON_PACKAGES:
        for module in pkgutil.walk_packages(importlib.import_module(package).__path__,
                                            f"{package}."):
            if ".migrations" not in module.name:  # Alembic scripts, run by Alembic only
                importlib.import_module(module.name)
    with tempfile.TemporaryDirectory() as folder, sqlite_database(Path(folder)) as url:
        engine = create_database_engine(url)
        try:
            inventory = list(InventoryCollector(engine).collect())
        finally:
            engine.dispose()
    return _sample_names(REGISTRY.collect()) | _sample_names(inventory)


def query_metric_names(expr: str) -> set[str]:
    """Returns the metric names a PromQL expression selects (functions and labels left out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range and subquery durations
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        following = text[match.end():].lstrip()[:1]
        word = match.group()
        if following == "(" or word.lower() in _PROMQL_WORDS:
            continue  # a function or aggregation, or a keyword
        if re.fullmatch(r"\d+[smhdwy]", word) or text[match.start() - 1:match.start()].isdigit():
            continue
        names.add(word)
    return names
