"""Management's Prometheus metrics: the inventory counted at scrape time, and job durations.

``InventoryCollector`` runs a few grouped counts on the database each time
Prometheus scrapes (every daemon of an HA pair reports the same numbers, so
aggregate them with ``max``, not ``sum``):

- ``hostdev_hosts{status}``: hosts by status (Up, Disconnected, Down, Maintenance);
- ``hostdev_pci_devices{name, state}``: passthrough devices by name and state;
- ``hostdev_vms{state}``: VMs by state (Destroyed ones are not counted);
- ``hostdev_jobs_unfinished{kind, state}``: jobs pending or running;
- ``hostdev_jobs_overdue{kind}``: running jobs past their deadline, which the
  sweeper should have expired (kinds with none are omitted);
- ``hostdev_foreign_domains{host}``: domains a host's last complete report
  listed that management did not place there (hosts with none are omitted);
- ``hostdev_inventory_up``: 1 when the counts above were read, 0 when the
  database failed (the counts are then missing).

``hostdev_job_duration_seconds{kind, outcome}`` is a histogram observed by the
daemon that finishes a job, once its transaction committed; its ``_count``
is the number of jobs by kind and outcome (sum it across daemons).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import structlog
from prometheus_client import Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from sqlalchemy import Engine, func, select

from hostdev.messages.runtime.metrics import MetricsServer, serve_metrics
from hostdev.mgmt.persistence.models import (
    DEVICE_STATES,
    HOST_STATUSES,
    JOB_PENDING,
    JOB_RUNNING,
    VM_DESTROYED,
    Host,
    Job,
    PciDevice,
    VmInstance,
    utcnow,
)

log = structlog.get_logger()

JOB_DURATION = Histogram(
    "hostdev_job_duration_seconds", "Time from a job's creation to its end, by kind and "
    "outcome (succeeded, failed).", ["kind", "outcome"],
    buckets=(0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0))


def job_duration(job: Job) -> Callable[[], None]:
    """Returns what observes a finished job's duration; run it once the finish committed."""
    if job.created_at is None or job.finished_at is None:
        return _nothing
    seconds = max(0.0, (job.finished_at - job.created_at).total_seconds())
    kind, outcome = job.kind, job.state

    def observe() -> None:
        JOB_DURATION.labels(kind, outcome).observe(seconds)
    return observe


def _nothing() -> None:
    """Observes nothing (a job without timestamps)."""


class InventoryCollector:
    """Counts hosts, devices, VMs and unfinished jobs in the database at each scrape."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        """Yields the gauges (``prometheus_client`` calls this on every scrape)."""
        up = GaugeMetricFamily("hostdev_inventory_up",
                               "1 when the inventory counts could be read from the database.")
        try:
            families = self._count()
        except Exception as exc:  # a scrape must answer even when the database does not
            log.warning("metrics_inventory_failed", error=str(exc))
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _count(self) -> list[Metric]:
        hosts = GaugeMetricFamily("hostdev_hosts", "Hosts by status.", labels=["status"])
        devices = GaugeMetricFamily("hostdev_pci_devices",
                                    "Passthrough PCI devices by name and state.",
                                    labels=["name", "state"])
        vms = GaugeMetricFamily("hostdev_vms", "VMs by state (Destroyed not counted).",
                                labels=["state"])
        jobs = GaugeMetricFamily("hostdev_jobs_unfinished", "Jobs pending or running, by kind.",
                                 labels=["kind", "state"])
        overdue = GaugeMetricFamily("hostdev_jobs_overdue",
                                    "Running jobs past their deadline (not yet expired), by kind.",
                                    labels=["kind"])
        foreign = GaugeMetricFamily("hostdev_foreign_domains",
                                    "Domains a host runs that management did not place there.",
                                    labels=["host"])
        with self.engine.connect() as conn:
            by_status = dict(conn.execute(
                select(Host.status, func.count()).group_by(Host.status)).all())
            by_device = conn.execute(select(PciDevice.name, PciDevice.state, func.count())
                                     .group_by(PciDevice.name, PciDevice.state)).all()
            by_vm = conn.execute(select(VmInstance.state, func.count())
                                 .where(VmInstance.state != VM_DESTROYED)
                                 .group_by(VmInstance.state)).all()
            by_job = conn.execute(select(Job.kind, Job.state, func.count())
                                  .where(Job.state.in_((JOB_PENDING, JOB_RUNNING)))
                                  .group_by(Job.kind, Job.state)).all()
            by_overdue = conn.execute(select(Job.kind, func.count())
                                      .where(Job.state == JOB_RUNNING, Job.deadline < utcnow())
                                      .group_by(Job.kind)).all()
            by_host = conn.execute(select(Host.guid, Host.foreign_domains)
                                   .where(Host.foreign_domains > 0)).all()
        for status in (*HOST_STATUSES, *sorted(set(by_status) - set(HOST_STATUSES))):
            hosts.add_metric([status], by_status.get(status, 0))
        counts = {(name, state): count for name, state, count in by_device}
        for name in sorted({name for name, _ in counts}):
            for device_state in DEVICE_STATES:  # every state of every name, zeros included
                devices.add_metric([name, device_state], counts.get((name, device_state), 0))
        for vm_state, count in by_vm:
            vms.add_metric([vm_state], count)
        for kind, job_state, count in by_job:
            jobs.add_metric([kind, job_state], count)
        for kind, count in by_overdue:
            overdue.add_metric([kind], count)
        for guid, count in by_host:
            foreign.add_metric([guid], count)
        return [hosts, devices, vms, jobs, overdue, foreign]


def serve_mgmt_metrics(port: int | None, engine: Engine) -> MetricsServer | None:
    """Serves ``/metrics`` with the bus counters, job durations and the inventory of ``engine``."""
    return serve_metrics(port, extra=(InventoryCollector(engine),))
