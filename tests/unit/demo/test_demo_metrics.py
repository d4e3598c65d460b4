"""The management metrics endpoint, scraped over HTTP after the in-process demo ran."""

from __future__ import annotations

import io
import re
import urllib.request
from pathlib import Path

import pytest

from hostdev.demo.cloud import InProcessCloud
from hostdev.demo.scenario import run_scenario
from hostdev.mgmt.metrics import serve_mgmt_metrics

pytestmark = pytest.mark.libvirt


def _value(text: str, metric: str, **labels: str) -> float:
    """Returns the sample ``metric{labels}`` of an exposition text (labels in any order)."""
    for line in text.splitlines():
        match = re.match(r"^([a-zA-Z_:]+)(?:\{(.*)\})? (\S+)$", line)
        if not match or match[1] != metric:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match[2] or ""))
        if found == labels:
            return float(match[3])
    raise AssertionError(f"no sample {metric}{labels} in the scrape")


def test_scrape_shows_the_demo_inventory_jobs_and_messages(tmp_path: Path) -> None:
    """A scrape after the demo shows its hosts, devices by name and state, jobs and messages."""
    cloud = InProcessCloud(tmp_path).start()
    server = serve_mgmt_metrics(0, cloud.engine)
    assert server is not None
    try:
        run_scenario(cloud, io.StringIO())
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics",
                                    timeout=10) as response:
            assert response.status == 200
            text = response.read().decode()
    finally:
        server.close()
        cloud.close()
    assert _value(text, "hostdev_inventory_up") == 1
    assert _value(text, "hostdev_hosts", status="Up") == 3
    assert _value(text, "hostdev_hosts", status="Down") == 0
    assert _value(text, "hostdev_pci_devices", name="GPU", state="allocated") == 3
    assert _value(text, "hostdev_pci_devices", name="GPU", state="free") == 0
    assert _value(text, "hostdev_pci_devices", name="10GE", state="allocated") == 4
    assert _value(text, "hostdev_pci_devices", name="10GE", state="free") == 4
    assert _value(text, "hostdev_vms", state="Stopped") == 1
    # Counters are process-wide: other tests may have added to them.
    assert _value(text, "hostdev_job_duration_seconds_count", kind="deploy",
                  outcome="succeeded") >= 6
    assert _value(text, "hostdev_messages_handled_total", type="DeployVmRequest",
                  outcome="ack") >= 7
    assert _value(text, "hostdev_messages_handled_total", type="StartCommand",
                  outcome="ack") >= 6
    assert "hostdev_bus_reconnects_total" in text
