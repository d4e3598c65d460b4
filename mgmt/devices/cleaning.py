"""Devices waiting for their host's reset: asking for it, and the one way out of cleaning.

On a host whose agent announced ``pci_reset_on_release``, a device a VM lets
go of becomes ``cleaning`` (``pci_devices``), never offered until its reset is
reported. Management sends ``ResetPciDevicesCommand`` with the host's
cleaning devices after each release, again when the host re-registers
(answers lost, agent down), and when an operator enables a device whose reset
failed. :func:`finish_cleaning` is the only transition out of ``cleaning``:
reset -> ``free``; failed -> ``quarantined`` with the reason, held by nobody
(an operator's ``hostdev device enable`` asks for the reset again).

Trust: an answer counts only when it correlates to a ``ResetPciDevicesCommand``
management sent to the answering host (the outbox keeps the command), and only
for the addresses that command listed and that are still cleaning there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import structlog
from sqlalchemy import Connection, and_, select, update

from hostdev.messages.codec import decode
from hostdev.messages.commands import ResetPciDevicesAnswer, ResetPciDevicesCommand
from hostdev.messages.limits import MAX_LABEL, clip
from hostdev.messages.pci_address import PciAddress
from hostdev.messages.values import DeviceState
from hostdev.mgmt.devices import host_rules
from hostdev.mgmt.devices.device_rows import (
    ADDRESS_COLUMNS,
    CLEANING,
    DEVICES,
    FREE,
    QUARANTINED,
    C,
    address_is,
    address_of,
    state_is,
)
from hostdev.mgmt.errors import ForgedAnswer
from hostdev.mgmt.persistence.models import Host, OutboxEvent, utcnow
from hostdev.mgmt.persistence.unit_of_work import TxContext

log = structlog.get_logger()

#: The reason a device whose reset failed keeps, before the agent's words.
RESET_FAILED = "reset failed"


@dataclass(frozen=True, slots=True)
class Cleaned:
    """What :func:`finish_cleaning` changed on one host, by address."""

    host_id: int
    freed: tuple[PciAddress, ...] = ()
    quarantined: tuple[PciAddress, ...] = ()


def finish_cleaning(conn: Connection, host_id: int,
                    results: Mapping[PciAddress, str | None]) -> Cleaned:
    """Moves devices of one host out of ``cleaning``: the ONE way out of that state.

    Args:
        conn: the caller's transaction.
        host_id: the host the devices are on.
        results: address -> None when the device was reset, else why it was not.

    A device that is not cleaning (any more) is left alone: each UPDATE is
    conditional on ``state = cleaning``. Returns the addresses that moved.
    """
    freed: list[PciAddress] = []
    quarantined: list[PciAddress] = []
    now = utcnow()
    ruled = host_rules.serialize(conn, host_id)  # the host row first, then its devices
    for address, failure in sorted(results.items()):
        target: DeviceState = FREE if failure is None else QUARANTINED
        reason = "" if failure is None else clip(
            failure if failure.startswith(RESET_FAILED) else f"{RESET_FAILED}: {failure}",
            MAX_LABEL)
        changed = conn.execute(
            update(DEVICES)
            .where(C.host_id == host_id, address_is(address), state_is(CLEANING))
            .values(state=target, reason=reason, instance_id=None, reserved_for=None,
                    updated_at=now)).rowcount
        if changed:
            (freed if failure is None else quarantined).append(address)
    if ruled and (freed or quarantined):
        host_rules.apply_rules(conn, host_id)  # a device let go may free its group or PF
    if freed or quarantined:
        log.info("pci_devices_cleaned", host_id=host_id, freed=[str(a) for a in freed],
                 quarantined=[str(a) for a in quarantined])
    return Cleaned(host_id, tuple(freed), tuple(quarantined))


def cleaning_addresses(conn: Connection, host_id: int) -> tuple[PciAddress, ...]:
    """Returns the addresses of a host's devices waiting for their reset, in order."""
    query = (select(C.domain, C.bus, C.slot, C.function)
             .where(C.host_id == host_id, state_is(CLEANING)).order_by(*ADDRESS_COLUMNS))
    return tuple(address_of(row) for row in conn.execute(query))


def request_resets(tx: TxContext, host: Host,
                   cleaning: Sequence[PciAddress] | None = None) -> tuple[PciAddress, ...]:
    """Asks a host's agent to reset every device of it that is cleaning; returns them.

    ``cleaning``: those devices, in order, when the caller holds them locked
    (a start-up's reconciliation); else they are read.
    A host that no longer resets devices (its agent stopped announcing
    ``pci_reset_on_release``) will never answer: its cleaning devices are
    freed at once instead.
    """
    addresses = tuple(cleaning) if cleaning is not None \
        else cleaning_addresses(tx.connection, host.id)
    if not addresses:
        return ()
    if not host.reset_on_release:
        finish_cleaning(tx.connection, host.id, dict.fromkeys(addresses))
        return ()
    tx.outbox.send(f"agent.{host.guid}.{ResetPciDevicesCommand.__name__}",
                   ResetPciDevicesCommand(addresses=addresses))
    log.info("pci_reset_requested", host=host.guid, addresses=[str(a) for a in addresses])
    return addresses


def request_resets_on(tx: TxContext, host_ids: set[int]) -> None:
    """Asks each of these hosts that resets released devices for its cleaning devices."""
    if not host_ids:
        return
    hosts = tx.session.scalars(select(Host).where(Host.id.in_(sorted(host_ids)),
                                                  Host.reset_on_release.is_(True)))
    for host in list(hosts):
        request_resets(tx, host)


def retry_reset(tx: TxContext, host: Host, device_id: int) -> bool:
    """Asks again for the reset of a device whose reset failed; False if it is not one.

    Such a device is quarantined and held by nobody; it becomes cleaning (or
    free, on a host that no longer resets devices).
    """
    target: DeviceState = CLEANING if host.reset_on_release else FREE
    ruled = host_rules.serialize(tx.connection, host.id)
    changed = tx.connection.execute(
        update(DEVICES)
        .where(C.id == device_id, state_is(QUARANTINED),
               and_(C.instance_id.is_(None), C.reserved_for.is_(None)))
        .values(state=target, reason="", updated_at=utcnow())).rowcount
    if changed and ruled:
        host_rules.apply_rules(tx.connection, host.id)
    if changed and target == CLEANING:
        request_resets(tx, host)
    return bool(changed)


def on_reset_answer(tx: TxContext, answer: ResetPciDevicesAnswer,
                    correlation_id: str | None, sender: str | None) -> Cleaned:
    """Applies an agent's reset outcomes to the devices its command listed.

    Raises:
        ForgedAnswer: the answer correlates to no ``ResetPciDevicesCommand``
            management sent to the sending host; nothing changes.
    """
    who = f"host {sender}" if sender else "a sender naming no host"
    row = tx.session.execute(select(OutboxEvent.routing_key, OutboxEvent.body)
                             .where(OutboxEvent.message_id == (correlation_id or ""))).first()
    expected = f"agent.{sender}.{ResetPciDevicesCommand.__name__}"
    if not correlation_id or row is None or row.routing_key != expected:
        raise ForgedAnswer(
            f"a ResetPciDevicesAnswer from {who} correlates to {correlation_id or 'nothing'}, "
            "which is no ResetPciDevicesCommand management sent to that host (a guessed id, "
            "another host's command, or one purged long ago); nothing changed")
    asked = set(cast(ResetPciDevicesCommand, decode(row.body)).addresses)
    host = tx.session.scalar(select(Host).where(Host.guid == sender).with_for_update())
    if host is None:
        raise ForgedAnswer(f"a ResetPciDevicesAnswer from {who}: no such host; nothing changed")
    results: dict[PciAddress, str | None] = {}
    for outcome in answer.devices:
        address = PciAddress(outcome.address)
        if address not in asked:
            log.warning("pci_reset_outcome_ignored", host=host.guid, address=str(address),
                        reason="the command did not ask to reset this device")
            continue
        results[address] = None if outcome.result == "ok" else (outcome.details
                                                                 or "the agent gave no reason")
    return finish_cleaning(tx.connection, host.id, results)
