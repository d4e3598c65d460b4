"""Helpers of the migration fault-injection matrix: faults, VMs, invariants on a ``Stack``."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine

from hostdev.agent import simulated_store
from hostdev.messages import api
from hostdev.messages.values import DomainInfo
from hostdev.mgmt.persistence.database import create_database_engine
from tests.support.e2e_stack import SimHost, Stack
from tests.support.migration_checks import violations
from tests.support.processes import Daemon
from tests.support.waiting import wait_for

_VERSIONS = itertools.count(1)


def set_faults(host: SimHost, **faults: Any) -> None:
    """Writes a host's faults file and waits until its agent applied it."""
    version = next(_VERSIONS)
    simulated_store.write_faults(f"simulated://{host.spec_path}", version=version, **faults)
    host.daemon.wait_log("simulated_faults_applied", timeout=15, version=version)


def set_faults_file_only(host: SimHost, **faults: Any) -> None:
    """Writes a host's faults file without waiting (its agent is down)."""
    simulated_store.write_faults(f"simulated://{host.spec_path}", version=next(_VERSIONS),
                                 **faults)


def domains_of(stack: Stack) -> dict[str, list[DomainInfo]]:
    """Every host's domains as its simulated libvirt holds them (the state files)."""
    return {host.guid: [DomainInfo(uuid=uuid, name=name,
                                   state="running" if running else "stopped",
                                   hostdevs=hostdevs)
                        for uuid, (name, running, hostdevs) in host.domains().items()]
            for host in stack.hosts.values()}


@contextmanager
def database(stack: Stack) -> Iterator[Engine]:
    """An engine on the stack's database."""
    engine = create_database_engine(stack.db_url)
    try:
        yield engine
    finally:
        engine.dispose()


def settle(stack: Stack, engine: Engine, timeout: float = 20.0) -> None:
    """Waits until every invariant holds (agents and daemons settle on their own)."""
    def holds() -> bool:
        return not violations(engine, domains_of(stack))
    try:
        wait_for(holds, timeout=timeout, what="the migration invariants")
    except AssertionError:
        broken = violations(engine, domains_of(stack))
        raise AssertionError("invariants broken:\n" + "\n".join(broken)) from None


def deploy(stack: Stack, name: str, offering: str, on: str) -> str:
    """Deploys a VM on host ``on`` (the others avoided); returns its uuid."""
    avoid = tuple(h for h in stack.hosts if h != on)
    accepted = stack.request(api.DeployVmRequest(name=name, offering=offering, avoid=avoid))
    assert isinstance(accepted, api.JobAccepted), accepted
    job = stack.wait_job(accepted.job_id)
    assert job.state == "succeeded", job.details
    assert accepted.vm_uuid is not None
    return accepted.vm_uuid


def vm_row(stack: Stack, name: str) -> api.VmRow:
    """Returns one VM as the API lists it."""
    answer = stack.request(api.ListVmsRequest())
    assert isinstance(answer, api.VmList)
    (row,) = [vm for vm in answer.vms if vm.name == name]
    return row


def migrate(stack: Stack, name: str, to: str) -> int:
    """Begins a migration through the API; returns the job id."""
    accepted = stack.request(api.MigrateVmRequest(vm=name, destination=to))
    assert isinstance(accepted, api.JobAccepted), accepted
    return accepted.job_id


def hostdevs(stack: Stack, host: str, vm_uuid: str) -> set[str]:
    """The PCI addresses the VM's domain holds on a host (empty when absent)."""
    found = stack.hosts[host].domains().get(vm_uuid)
    return {str(a) for a in found[2]} if found else set()


def mgmt_that_began(stack: Stack, vm_uuid: str, timeout: float = 15.0) -> Daemon:
    """Returns the management daemon that logged ``migration_started`` for the VM."""
    def find() -> Daemon | None:
        for daemon in stack.mgmts:
            if any(r.get("event") == "migration_started" and r.get("vm") == vm_uuid
                   for r in daemon.records()):
                return daemon
        return None
    return wait_for(find, timeout=timeout, what=f"a daemon to begin migrating {vm_uuid}")
