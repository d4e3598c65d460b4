"""Command handlers: what the agent does for each command, idempotent under redelivery.

Each handler reads libvirt's state first, so running it twice for the same
command gives the same result (a device already attached is a success, a
domain already running is started). Handlers never raise for an outcome the
sender must hear about: they answer ``result="error"`` with ``details`` saying
what failed, where, and what was done about it.

Timeouts: a command's own timeout applies, capped by the agent's configured
one (the operator decides the longest a host waits).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import structlog

from hostdev.agent.domain_needs import (
    create_volumes,
    host_refusal,
    own_volumes,
    remove_volumes,
)
from hostdev.agent.domain_xml import (
    OwnVolume,
    build_domain_xml,
    domain_refusal,
    read_own_volumes,
    with_own_volumes,
)
from hostdev.agent.errors import DetachRefused, DomainNotFound, HypervisorError, MigrationFailed
from hostdev.agent.hypervisor import Hypervisor
from hostdev.agent.migration_outcome import landed_elsewhere
from hostdev.messages.base import Message
from hostdev.messages.commands import (
    AttachPciDevicesAnswer,
    AttachPciDevicesCommand,
    DetachPciDevicesAnswer,
    DetachPciDevicesCommand,
    MigrateAnswer,
    MigrateCommand,
    ResetPciDevicesAnswer,
    ResetPciDevicesCommand,
    StartAnswer,
    StartCommand,
    StopAnswer,
    StopCommand,
)
from hostdev.messages.domain_template import read_needs
from hostdev.messages.pci_address import PciAddress
from hostdev.messages.values import DeviceOutcome, DomainInfo

log = structlog.get_logger()

#: The answer type of each command, for an error answered without running it.
_ANSWERS: dict[type[Message], Callable[..., Message]] = {
    StartCommand: StartAnswer, StopCommand: StopAnswer, MigrateCommand: MigrateAnswer,
    AttachPciDevicesCommand: AttachPciDevicesAnswer,
    DetachPciDevicesCommand: DetachPciDevicesAnswer,
    ResetPciDevicesCommand: lambda result, vm_uuid, details: ResetPciDevicesAnswer(
        result=result, details=details),
}


def failure_answer(command: Message, vm_uuid: str, details: str) -> Message:
    """Returns the ``result="error"`` answer to ``command`` saying what failed."""
    return _ANSWERS[type(command)](result="error", vm_uuid=vm_uuid, details=details)


@dataclass(frozen=True)
class Timeouts:
    """The agent's ceilings for waiting on libvirt, in seconds."""

    attach_s: float = 10.0
    detach_s: float = 10.0
    migration_s: float = 300.0


class CommandHandlers:
    """Runs commands against a ``Hypervisor`` for the devices in the inventory."""

    def __init__(self, hypervisor: Hypervisor, inventory: Mapping[PciAddress, str],
                 timeouts: Timeouts | None = None) -> None:
        self.hypervisor = hypervisor
        self.inventory = dict(inventory)
        self.timeouts = timeouts or Timeouts()

    # -- shared checks -----------------------------------------------------------

    def _refusals(self, addresses: Iterable[PciAddress],
                  vm_uuid: str) -> dict[PciAddress, str]:
        """Says why each of ``addresses`` cannot be given to ``vm_uuid``; the rest can be.

        Not in the inventory, or held by another running (or paused) domain:
        libvirt's domains are read once for all the addresses.
        """
        wanted = tuple(addresses)
        listed = ", ".join(sorted(self.inventory)) or "none"
        holders = self._holders(vm_uuid) if any(a in self.inventory for a in wanted) else {}
        refusals: dict[PciAddress, str] = {}
        for address in wanted:
            if address not in self.inventory:
                refusals[address] = (f"{address} is not a passthrough device of this host "
                                     f"(pci.devices lists: {listed})")
            elif (holder := holders.get(address)) is not None:
                refusals[address] = (f"{address} is held by domain {holder.name} "
                                     f"({holder.uuid}), which is running")
        return refusals

    def _holders(self, vm_uuid: str) -> dict[PciAddress, DomainInfo]:
        """Returns the running domains other than ``vm_uuid`` by the devices they hold."""
        holders: dict[PciAddress, DomainInfo] = {}
        for domain in self.hypervisor.domains():
            if domain.uuid != vm_uuid and domain.state in ("running", "paused"):
                for address in domain.hostdevs:
                    holders.setdefault(address, domain)
        return holders

    # -- StartCommand --------------------------------------------------------------

    def start(self, command: StartCommand) -> StartAnswer:
        """Defines and starts the VM with its hostdevs; refuses foreign or busy devices."""
        spec = command.vm
        wanted = tuple(dict.fromkeys(PciAddress(a) for a in spec.pci_devices))
        current = self.hypervisor.domain(spec.uuid)
        if current is not None and current.state == "running" \
                and set(wanted) <= set(current.hostdevs):
            return StartAnswer(vm_uuid=spec.uuid, hostdevs=current.hostdevs,
                               details="already running with its devices")
        refusals = self._refusals(wanted, spec.uuid)
        if refusals:
            return StartAnswer(result="error", vm_uuid=spec.uuid,
                               details="refused to start: " + "; ".join(refusals.values()))
        if current is not None and current.state == "running":
            try:
                for address in wanted:  # running without all of them: plug the rest
                    self.hypervisor.attach_hostdev(spec.uuid, address, self.timeouts.attach_s)
            except HypervisorError as exc:
                return StartAnswer(result="error", vm_uuid=spec.uuid, details=str(exc))
        else:
            failure = self._define_and_start(command, is_new=current is None)
            if failure:
                return StartAnswer(result="error", vm_uuid=spec.uuid, details=failure)
        after = self.hypervisor.domain(spec.uuid)
        log.info("domain_started", vm=spec.uuid, hostdevs=wanted)
        return StartAnswer(vm_uuid=spec.uuid, hostdevs=after.hostdevs if after else wanted)

    def _define_and_start(self, command: StartCommand, *, is_new: bool) -> str | None:
        """Checks the domain and the host, makes the VM's volumes, defines and starts it.

        Returns what failed, or None. A refusal creates nothing; a failure
        after that removes what this start created (a new domain's
        definition, the volumes it made), so nothing is left behind.
        """
        spec = command.vm
        xml = command.domain_xml or build_domain_xml(spec)
        refusal = domain_refusal(xml, spec) if command.domain_xml else None
        needs = read_needs(xml)
        refusal = refusal or host_refusal(self.hypervisor, needs)
        if refusal:
            return f"refused to start: {refusal}"
        volumes = own_volumes(needs, spec.uuid)
        created: list[OwnVolume] = []
        try:
            created = create_volumes(self.hypervisor, volumes)
            self.hypervisor.define(with_own_volumes(xml, spec.uuid, needs.base_images))
            self.hypervisor.start(spec.uuid)
        except HypervisorError as exc:
            failures = self._undo_start(spec.uuid, is_new, created)
            return " ".join([f"{exc}; nothing this start created was kept", *failures])
        return None

    def _undo_start(self, uuid: str, is_new: bool, created: list[OwnVolume]) -> list[str]:
        failures: list[str] = []
        if is_new:
            try:
                self.hypervisor.undefine(uuid)
            except HypervisorError as exc:
                failures.append(f"undefining it failed: {exc}")
        return failures + remove_volumes(self.hypervisor, created)

    # -- StopCommand ---------------------------------------------------------------

    def stop(self, command: StopCommand) -> StopAnswer:
        """Stops the VM gracefully (or at once with ``force``); optionally undefines it."""
        uuid = command.vm_uuid
        current = self.hypervisor.domain(uuid)
        if current is None:
            return StopAnswer(vm_uuid=uuid, state="stopped", details="no such domain here; "
                              "nothing to stop")
        try:
            state = current.state
            if state != "stopped":
                if command.force:
                    self.hypervisor.destroy(uuid)
                    state = "stopped"
                else:
                    state = self.hypervisor.shutdown(uuid, command.timeout_s)
            if state != "stopped":
                return StopAnswer(result="error", vm_uuid=uuid, state=state, details=(
                    f"the guest did not power off within {command.timeout_s:g} s; "
                    "send StopCommand with force=true to power it off"))
            if command.undefine:
                volumes = read_own_volumes(self.hypervisor.domain_xml(uuid, inactive=True))
                self.hypervisor.undefine(uuid)
                failures = remove_volumes(self.hypervisor, volumes)
                if failures:
                    return StopAnswer(result="error", vm_uuid=uuid, state="stopped",
                                      details="undefined, but " + "; ".join(failures))
        except DomainNotFound:
            return StopAnswer(vm_uuid=uuid, state="stopped", details="domain vanished")
        except HypervisorError as exc:
            after = self.hypervisor.domain(uuid)
            return StopAnswer(result="error", vm_uuid=uuid, details=str(exc),
                              state=after.state if after else "unknown")
        log.info("domain_stopped", vm=uuid, force=command.force, undefine=command.undefine)
        return StopAnswer(vm_uuid=uuid, state="stopped")

    # -- MigrateCommand ------------------------------------------------------------

    def _reattach(self, uuid: str, addresses: list[PciAddress]) -> tuple[list[PciAddress],
                                                                         list[str]]:
        """Re-attaches in reverse order; returns those put back and the failures."""
        done: list[PciAddress] = []
        failures: list[str] = []
        for address in reversed(addresses):
            try:
                self.hypervisor.attach_hostdev(uuid, address, self.timeouts.attach_s)
                done.append(address)
            except HypervisorError as exc:
                failures.append(f"re-attaching {address} failed: {exc}")
                log.error("reattach_failed", vm=uuid, address=address, error=str(exc))
        return done, failures

    def migrate(self, command: MigrateCommand) -> MigrateAnswer:
        """Detaches every hostdev, migrates, and rolls back whatever step fails."""
        uuid = command.vm_uuid
        current = self.hypervisor.domain(uuid)
        if current is None:
            if self.hypervisor.has_domain_at(command.destination_uri, uuid):
                return MigrateAnswer(vm_uuid=uuid, details="already migrated to "
                                     f"{command.destination_uri}")
            return MigrateAnswer(result="error", vm_uuid=uuid, failed_step="migrate",
                                 details=f"domain {uuid} is not on this host")
        if current.state != "running":
            return MigrateAnswer(result="error", vm_uuid=uuid, failed_step="migrate",
                                 details=f"domain {uuid} is {current.state}; only a running "
                                 "domain migrates live")
        copied = self._own_volumes_to_copy(uuid)
        try:
            for volume in copied:  # before any device leaves: a refusal changes nothing
                self.hypervisor.prepare_volume_at(command.destination_uri, volume.pool,
                                                  volume.volume, volume.base)
        except HypervisorError as exc:
            return MigrateAnswer(result="error", vm_uuid=uuid, failed_step="migrate",
                                 details=f"migration refused: {exc}; the VM stays here with "
                                 "its devices")
        detach_s = min(command.detach_timeout_s, self.timeouts.detach_s)
        detached: list[PciAddress] = []
        for address in current.hostdevs:
            try:
                self.hypervisor.detach_hostdev(uuid, address, detach_s)
            except HypervisorError as exc:
                reattached, failures = self._reattach(uuid, detached)
                log.warning("migration_cancelled", vm=uuid, refused=address,
                            detached=detached, reattached=reattached)
                reason = "refused to release" if isinstance(exc, DetachRefused) else "failed"
                return MigrateAnswer(
                    result="error", vm_uuid=uuid, failed_step="detach", refused_device=address,
                    detached=tuple(detached), reattached=tuple(reattached),
                    details=" ".join([f"migration cancelled: {address} {reason} the detach "
                                      f"({exc}); the VM stays here with its devices", *failures]))
            detached.append(address)
        migrate_s = min(command.migrate_timeout_s, self.timeouts.migration_s)
        try:
            self.hypervisor.migrate(uuid, command.destination_uri, migrate_s,
                                    copy_storage=bool(copied), numa_node=command.numa_node)
        except (MigrationFailed, HypervisorError) as exc:
            if not landed_elsewhere(self.hypervisor, uuid, command.destination_uri):
                reattached, failures = self._reattach(uuid, detached)
                log.warning("migration_failed", vm=uuid, error=str(exc), reattached=reattached)
                return MigrateAnswer(
                    result="error", vm_uuid=uuid, failed_step="migrate",
                    detached=tuple(detached), reattached=tuple(reattached),
                    details=" ".join([f"migration failed ({exc}); devices re-attached on the "
                                      "source", *failures]))
            log.warning("migration_error_after_hand_over", vm=uuid, error=str(exc),
                        hint="the domain left this host and is on the destination: the "
                             "migration is done; its devices stay detached here")
        log.info("domain_migrated", vm=uuid, destination=command.destination_uri,
                 detached=detached)
        failures = remove_volumes(self.hypervisor, copied)  # copied over: gone from here
        return MigrateAnswer(vm_uuid=uuid, detached=tuple(detached),
                             details="; ".join(failures))

    def _own_volumes_to_copy(self, uuid: str) -> tuple[OwnVolume, ...]:
        """Returns the VM's own volumes a migration copies: none on shared storage."""
        xml = self.hypervisor.domain_xml(uuid, inactive=True)
        return () if read_needs(xml).shared_storage else read_own_volumes(xml)

    # -- Attach/DetachPciDevicesCommand ----------------------------------------------

    def attach(self, command: AttachPciDevicesCommand) -> AttachPciDevicesAnswer:
        """Attaches each device; one already attached is a success."""
        uuid = command.vm_uuid
        current = self.hypervisor.domain(uuid)
        if current is None:
            outcomes = tuple(DeviceOutcome(address=a, result="error",
                                           details=f"domain {uuid} is not on this host")
                             for a in command.addresses)
            return AttachPciDevicesAnswer(result="error", vm_uuid=uuid, devices=outcomes,
                                          details=f"domain {uuid} is not on this host")
        timeout = min(command.timeout_s, self.timeouts.attach_s)
        outcomes_list: list[DeviceOutcome] = []
        refusals = self._refusals((a for a in command.addresses if a not in current.hostdevs),
                                  uuid)
        for address in command.addresses:
            if address in current.hostdevs:
                outcomes_list.append(DeviceOutcome(address=address, result="ok",
                                                   details="already attached"))
                continue
            refusal = refusals.get(address)
            if refusal:
                outcomes_list.append(DeviceOutcome(address=address, result="error",
                                                   details=refusal))
                continue
            try:
                self.hypervisor.attach_hostdev(uuid, address, timeout)
                outcomes_list.append(DeviceOutcome(address=address, result="ok"))
            except HypervisorError as exc:
                outcomes_list.append(DeviceOutcome(address=address, result="error",
                                                   details=str(exc)))
        return _per_device(AttachPciDevicesAnswer, uuid, outcomes_list, "attach")

    def detach(self, command: DetachPciDevicesCommand) -> DetachPciDevicesAnswer:
        """Detaches each device; one already detached (or an absent domain) is a success."""
        uuid = command.vm_uuid
        current = self.hypervisor.domain(uuid)
        timeout = min(command.timeout_s, self.timeouts.detach_s)
        outcomes: list[DeviceOutcome] = []
        for address in command.addresses:
            if current is None or address not in current.hostdevs:
                outcomes.append(DeviceOutcome(address=address, result="ok",
                                              details="not attached"))
                continue
            try:
                self.hypervisor.detach_hostdev(uuid, address, timeout)
                outcomes.append(DeviceOutcome(address=address, result="ok"))
            except HypervisorError as exc:
                outcomes.append(DeviceOutcome(address=address, result="error", details=str(exc)))
        return _per_device(DetachPciDevicesAnswer, uuid, outcomes, "detach")


    # -- ResetPciDevicesCommand -----------------------------------------------------

    def reset(self, command: ResetPciDevicesCommand) -> ResetPciDevicesAnswer:
        """Resets each device a VM let go of; refuses one a running domain holds or not listed.

        A device that cannot be reset is answered ``error`` with libvirt's
        reason; a libvirt failure worth retrying (connection lost) propagates,
        so the command is redelivered.
        """
        outcomes: list[DeviceOutcome] = []
        refusals = self._refusals(command.addresses, "")
        for address in command.addresses:
            refusal = refusals.get(address)
            if refusal is not None:
                outcomes.append(DeviceOutcome(address=address, result="error",
                                              details=f"not reset: {refusal}"))
                continue
            try:
                self.hypervisor.reset_pci_device(address)
            except HypervisorError as exc:
                if exc.transient:
                    raise
                outcomes.append(DeviceOutcome(address=address, result="error",
                                              details=str(exc)))
                continue
            outcomes.append(DeviceOutcome(address=address, result="ok"))
            log.info("pci_device_reset", address=str(address))
        failed = [o.address for o in outcomes if o.result == "error"]
        if failed:
            return ResetPciDevicesAnswer(result="error", devices=tuple(outcomes),
                                         details=f"could not reset {', '.join(failed)}; "
                                                 "see devices")
        return ResetPciDevicesAnswer(devices=tuple(outcomes))


_A = TypeVar("_A", AttachPciDevicesAnswer, DetachPciDevicesAnswer)


def _per_device(kind: type[_A], uuid: str, outcomes: list[DeviceOutcome], verb: str) -> _A:
    failed = [o.address for o in outcomes if o.result == "error"]
    if failed:
        return kind(result="error", vm_uuid=uuid, devices=tuple(outcomes),
                    details=f"could not {verb} {', '.join(failed)}; see devices")
    return kind(vm_uuid=uuid, devices=tuple(outcomes))
