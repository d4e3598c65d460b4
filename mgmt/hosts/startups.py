"""Start-ups in batches: the new hosts of a run registered in one transaction.

When a cloud (or the broker) comes up, every agent announces itself at once:
ten thousand ``StartupRoutingCommand`` in a few seconds. The bus hands the
start-ups it holds over as one run (``contract.Batching``, as pings) and
:meth:`StartupBatch.on_startups` registers the NEW hosts among them in ONE
transaction, in a fixed number of statements whatever the run's size:

1. which of the run's hosts already have a row (one read);
2. which hosts running migrations involve (one read, as a batch of pings);
3. the new hosts, in one multi-row ``INSERT`` (their ids come back with it);
4. their inventories, in one multi-row ``INSERT``, each device already in the
   state and with the reason the hardware rules give it, and each host's
   ``device_rules`` flag in its row;
5. their ``HostStatusChanged`` events, in the outbox's one ``INSERT``.

Each is answered ``StartupAnswer`` after the commit, as if registered alone
(``HostRegistry.on_startup``): the same row, devices, event, log line and
answer. A new host has no devices to reset, no VMs placed on it and no
migration (checked: its guid is in none), so nothing else applies; its
report is its first, so it is applied and its domains' digest remembered
(``pings.reconciled_digest``), as a start-up alone does.

The known hosts of the run whose start-up changes nothing but their row
are taken too (``hostdev.mgmt.hosts.restarts``). Every other start-up of the
run is handed back and registered alone, in its own transaction, by the full
path: a known host with something to reconcile (its devices, VMs,
migrations), a new host that reports domains
(foreign to management, recorded one by one), one whose report lists an
address twice (refused there, with the reason), a host whose guid comes
twice in the run or that a running migration names. A run whose
transaction fails (a value a column refuses, another daemon registering the
same host first) is handled alone too, start-up by start-up.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Final, cast

import structlog
from sqlalchemy import Table, insert, select

from hostdev.messages.base import Message
from hostdev.messages.bus.contract import Incoming
from hostdev.messages.codec import domains_digest
from hostdev.messages.commands import StartupAnswer, StartupRoutingCommand
from hostdev.messages.runtime.logging import bound_message
from hostdev.messages.values import PciDeviceInfo
from hostdev.mgmt.config import MgmtConfig
from hostdev.mgmt.devices import pci_inventory
from hostdev.mgmt.devices.device_rows import DEVICES
from hostdev.mgmt.devices.pci_inventory import ROW_COLUMNS, FirstInventory
from hostdev.mgmt.errors import InvalidRequest
from hostdev.mgmt.hosts.pings import reconciled_digest
from hostdev.mgmt.hosts.registration import announce_status_of
from hostdev.mgmt.hosts.restarts import take_restarts
from hostdev.mgmt.jobs.payloads import migrating_hosts
from hostdev.mgmt.persistence.literal_rows import insert_rows
from hostdev.mgmt.persistence.models import HOST_UP, Host, utcnow
from hostdev.mgmt.persistence.unit_of_work import TxContext
from hostdev.mgmt.placement import blocks

log = structlog.get_logger()

#: How long a start-up waits for others to share its transaction.
STARTUP_LINGER_S = 0.1
_HOSTS: Final = cast(Table, Host.__table__)
_INSERT_HOSTS: Final = insert(_HOSTS).returning(_HOSTS.c.id, sort_by_parameter_order=True)


class StartupBatch:
    """Registers the new hosts of a run of start-ups in one transaction."""

    def __init__(self, config: MgmtConfig) -> None:
        self._config = config

    def on_startups(self, tx: TxContext,
                    startups: Sequence[tuple[StartupRoutingCommand, Incoming]],
                    ) -> list[bool | Message]:
        """Registers the new hosts and answers them; False for each start-up to handle alone."""
        taken: list[bool | Message] = [False] * len(startups)
        times = Counter(startup.guid for startup, _ in startups)
        known = set(tx.connection.scalars(select(_HOSTS.c.guid).where(
            _HOSTS.c.guid.in_([guid for guid, count in times.items() if count == 1]))))
        migrating = migrating_hosts(tx.connection)
        restarts = {index: item for index, item in enumerate(startups)
                    if item[0].guid in known and item[0].guid not in migrating
                    and times[item[0].guid] == 1}
        if restarts:
            for index, answer in take_restarts(tx, self._config, restarts).items():
                taken[index] = answer
        not_new = known | migrating
        new = {index: inventory for index, inventory in _candidates(startups, times).items()
               if startups[index][0].guid not in not_new}
        if not new:
            return taken
        now = utcnow()
        # The digest a start-up remembers for its host's pings (``PingManager.on_startup``):
        # of its domains (none here) and of the VMs placed on the host (none: it is new).
        digest = reconciled_digest(domains_digest(()), [])
        rows = [_host_row(startups[index][0], inventory, now, digest)
                for index, inventory in new.items()]
        ids = list(tx.connection.execute(_INSERT_HOSTS, rows).scalars().all())
        blocks.raise_rows(tx.connection, [  # Up, with all their room: placement's blocks
            (host_id, startups[index][0].cpus, startups[index][0].memory_mb)
            for host_id, index in zip(ids, new, strict=True)])
        insert_rows(tx.connection, DEVICES, ROW_COLUMNS,
                    [row for host_id, inventory in zip(ids, new.values(), strict=True)
                     for row in inventory.rows(host_id, now)])
        for host_id, (index, inventory) in zip(ids, new.items(), strict=True):
            startup, incoming = startups[index]
            # Its log lines name its message, as the pipeline binds them for one alone.
            with bound_message(incoming.message_id, incoming.correlation_id,
                               host=startup.guid, vm=None):
                taken[index] = self._registered(tx, startup, host_id, inventory)
        return taken

    def _registered(self, tx: TxContext, startup: StartupRoutingCommand, host_id: int,
                    inventory: FirstInventory) -> StartupAnswer:
        """Announces a host registered here and returns its answer (as ``on_startup`` does)."""
        announce_status_of(tx, startup.guid, HOST_UP, None)
        devices = len(startup.pci_devices)
        log.info("host_registered", host=startup.guid, name=startup.name, host_id=host_id,
                 devices=devices, added=len(inventory.addresses), renamed=0, removed=0,
                 quarantined=0, vms_found_stopped=0)
        return StartupAnswer(host_id=host_id, ping_interval_s=self._config.ping_interval_s,
                             details=f"registered {startup.name} with {devices} PCI devices")


def _candidates(startups: Sequence[tuple[StartupRoutingCommand, Incoming]],
                times: Counter[str]) -> dict[int, FirstInventory]:
    """Returns the start-ups a batch may register if their host is new, by position.

    Not one whose host comes twice in the run (``times``), reports domains, or
    lists an address twice (the full path refuses it with the reason).
    """
    candidates: dict[int, FirstInventory] = {}
    # A fleet's hosts report the same inventory: each distinct one is ruled once.
    ruled: dict[tuple[PciDeviceInfo, ...], FirstInventory | None] = {}
    for index, (startup, _) in enumerate(startups):
        if times[startup.guid] != 1 or startup.domains:
            continue
        reported = tuple(startup.pci_devices)
        if reported not in ruled:
            try:
                ruled[reported] = FirstInventory.of(
                    pci_inventory.index_reported(f"host {startup.guid}", reported))
            except InvalidRequest:
                ruled[reported] = None
        inventory = ruled[reported]
        if inventory is not None:
            candidates[index] = inventory
    return candidates


def _host_row(startup: StartupRoutingCommand, inventory: FirstInventory, now: object,
              digest: str | None) -> dict[str, object]:
    """Returns the ``hosts`` row of a new host, as its start-up alone would leave it."""
    numbered = bool(startup.boot_id)  # report_order.admit: the first report of a boot
    return {
        "guid": startup.guid, "name": startup.name, "status": HOST_UP,
        "cpus": startup.cpus, "memory_mb": startup.memory_mb,
        "hypervisor_version": startup.hypervisor_version,
        "migration_uri": startup.migration_uri,
        "reset_on_release": startup.pci_reset_on_release,
        "last_ping": now, "created_at": now, "updated_at": now,
        "report_boot_id": startup.boot_id if numbered else None,
        "report_seq": startup.seq if numbered else None,
        "foreign_domains": 0, "device_rules": inventory.rules, "reconciled_digest": digest,
    }
