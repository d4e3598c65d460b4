"""``hostdev-agent`` processes on the lab's real libvirtd daemons, in an e2e ``Stack``.

``start_lab_agent`` writes an ``agent.properties`` for one lab host
(``libvirt.uri`` its daemon, ``lab.emulated.devices=yes``, the devices as
``device_addresses`` names them) and starts the agent as a process; the
caller stops it. ``lab_domains`` reads every domain of a daemon the way the
agent does, for the migration invariants (``tests.support.migration_checks``).
"""

from __future__ import annotations

import uuid as uuid_module
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from hostdev.agent.lab_host import LabHost
from hostdev.messages.pci_address import PciAddress
from hostdev.messages.values import DomainInfo
from tests.support.e2e_stack import Stack, device_addresses
from tests.support.processes import Daemon
from tests.support.realvm import LabHost as LabDaemon


@dataclass
class LabAgent:
    """A ``hostdev-agent`` process on one lab daemon."""

    name: str
    guid: str
    uri: str
    devices: dict[PciAddress, str]
    config_path: Path
    work: Path
    daemon: Daemon

    def restart(self) -> Daemon:
        """Starts the agent again on the same configuration (after ``daemon.kill()``)."""
        self.daemon = Daemon(f"agent-{self.name}", ["hostdev-agent", "--config",
                                                    str(self.config_path)], self.work).start()
        return self.daemon

    def host(self) -> LabHost:
        """Opens a ``LabHost`` on the agent's daemon, as the agent sees it (caller closes)."""
        host = LabHost(self.uri, self.devices)
        host.open()
        return host

    def domains(self) -> list[DomainInfo]:
        """Every domain of the daemon, with the devices it holds."""
        host = self.host()
        try:
            return list(host.domains())
        finally:
            host.close()

    def hostdevs(self, vm_uuid: str) -> set[str]:
        """The addresses a VM's domain holds here (empty when it is not here)."""
        found = [d for d in self.domains() if d.uuid == vm_uuid]
        return {str(a) for a in found[0].hostdevs} if found else set()


def start_lab_agent(stack: Stack, name: str, lab_host: LabDaemon,
                    devices: Mapping[str, int],
                    properties: Mapping[str, str] | None = None) -> LabAgent:
    """Starts ``hostdev-agent`` with the lab option on ``lab_host``'s daemon."""
    guid = str(uuid_module.uuid5(uuid_module.NAMESPACE_URL, f"{stack.work}/{name}"))
    addresses = device_addresses(devices)
    state = stack.work / f"{name}.agent"
    state.mkdir(exist_ok=True)
    config_path = stack.work / f"agent-{name}.properties"
    values = {"guid": guid, "name": name, "amqp.url": stack.vhost.url,
              "amqp.queue.type": stack.queue_type, "libvirt.uri": lab_host.uri,
              "pci.devices": ",".join(f"{a}|{n}" for a, n in addresses.items()),
              "lab.emulated.devices": "yes", "ping.interval": "1s", "state.dir": str(state),
              "log.format": "json", "log.level": "info", **(properties or {})}
    config_path.write_text("".join(f"{k}={v}\n" for k, v in values.items()), encoding="utf-8")
    daemon = Daemon(f"agent-{name}", ["hostdev-agent", "--config", str(config_path)],
                    stack.work).start()
    return LabAgent(name=name, guid=guid, uri=lab_host.uri, devices=addresses,
                    config_path=config_path, work=stack.work, daemon=daemon)
