"""The shipped Grafana dashboard: loads, and every panel queries metrics the daemons export."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.support.exported_metrics import (
    PROMETHEUS_SERIES,
    exported_metric_names,
    query_metric_names,
)
from tests.support.project import ROOT

DASHBOARD = ROOT / "etc" / "grafana" / "hostdev.json"


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Yields every panel that is not a row, rows' nested panels included."""
    for panel in panels:
        if panel["type"] == "row":
            yield from _panels(panel.get("panels", []))
        else:
            yield panel


def _dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def test_every_panel_queries_metrics_the_daemons_export() -> None:
    """Each panel has queries, and each query names only series a daemon (or Prometheus) writes."""
    exported = exported_metric_names() | PROMETHEUS_SERIES
    panels = list(_panels(_dashboard()["panels"]))
    assert len(panels) >= 10
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = query_metric_names(target["expr"])
            assert names, f"{panel['title']}: {target['expr']} names no metric"
            assert names <= exported, (
                f"{panel['title']}: {sorted(names - exported)} not exported by the daemons")


def test_the_dashboard_covers_what_an_operator_watches() -> None:
    """Hosts, devices by state and name, jobs, bus rates and dead letters each have a panel."""
    used = set()
    for panel in _panels(_dashboard()["panels"]):
        for target in panel["targets"]:
            used |= query_metric_names(target["expr"])
    assert {"hostdev_hosts", "hostdev_pci_devices", "hostdev_jobs_unfinished",
            "hostdev_job_duration_seconds_count", "hostdev_messages_handled_total",
            "hostdev_messages_dead_lettered_total"} <= used


def test_every_query_is_valid_promql(tmp_path: Path, promtool: str) -> None:
    """promtool parses each panel's query (written as recording rules)."""
    rules = [{"record": f"hostdev:panel_{index}", "expr": target["expr"]}
             for index, panel in enumerate(_panels(_dashboard()["panels"]))
             for target in panel["targets"]]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
