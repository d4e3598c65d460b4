"""A claim/release load for one process, and the checks run on its results.

Used by the MariaDB concurrency test: several processes run
:func:`run_claim_release_load` on one database; the parent merges what they
report and checks it against the rows with :func:`find_double_holds`.
"""

from __future__ import annotations

import itertools
import random
import time
from dataclasses import dataclass, field

import structlog

from hostdev.mgmt.devices.pci_devices import InsufficientDevices
from hostdev.mgmt.persistence.database import create_database_engine
from tests.support.pci_device_contract import ClaimPath


@dataclass
class LoadReport:
    """What one process did and what it believes its VMs hold at the end."""

    operations: int = 0
    claims: int = 0
    insufficient: int = 0
    releases: int = 0
    # (device id, vm id, start, end): a sub-interval of the time the VM held
    # the device (after the claim returned, before the release began); end is
    # None while still held.
    intervals: list[tuple[int, int, float, float | None]] = field(default_factory=list)
    holdings: dict[int, tuple[int, tuple[int, ...]]] = field(default_factory=dict)


def run_claim_release_load(
    url: str, vm_ids: list[int], host_ids: list[int], names: list[str], operations: int,
    seed: int,
) -> LoadReport:
    """Claims and releases at random for ``vm_ids`` until ``operations`` are done."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    engine = create_database_engine(url)
    repo = ClaimPath(engine, attempts=200)
    rng = random.Random(seed)
    report = LoadReport()
    open_intervals: dict[int, list[int]] = {}
    try:
        while report.operations < operations:
            vm = rng.choice(vm_ids)
            report.operations += 1
            if vm in report.holdings:
                report.holdings.pop(vm)
                ended = time.monotonic()
                for index in open_intervals.pop(vm):
                    device, holder, start, _ = report.intervals[index]
                    report.intervals[index] = (device, holder, start, ended)
                repo.release(vm)  # as on Stopped: every device of the VM
                report.releases += 1
                continue
            host = rng.choice(host_ids)
            requests = {name: rng.randint(1, 2) for name in rng.sample(names, rng.randint(1, 2))}
            try:
                held = repo.claim(vm, host, requests)
            except InsufficientDevices:
                report.insufficient += 1
                continue
            started = time.monotonic()
            report.claims += 1
            report.holdings[vm] = (host, tuple(d.id for d in held))
            open_intervals[vm] = []
            for device in held:
                open_intervals[vm].append(len(report.intervals))
                report.intervals.append((device.id, vm, started, None))
    finally:
        engine.dispose()
    return report


def find_double_holds(
    intervals: list[tuple[int, int, float, float | None]],
) -> list[tuple[int, int, int]]:
    """Returns (device, vm, other vm) wherever two VMs' holding intervals overlap."""
    by_device: dict[int, list[tuple[float, float, int]]] = {}
    for device, vm, start, end in intervals:
        by_device.setdefault(device, []).append((start, end if end is not None else 1e300, vm))
    overlaps = []
    for device, spans in by_device.items():
        spans.sort()
        for (_, end, vm), (next_start, _, next_vm) in itertools.pairwise(spans):
            if next_start < end:
                overlaps.append((device, vm, next_vm))
    return overlaps
