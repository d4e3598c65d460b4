"""The demo's three simulated hosts: 10GE NICs and GPUs in IOMMU groups.

Each host is a JSON spec for ``simulated:///`` (see docs/agent.md, "Simulated
hosts") plus the ``agent.properties`` that lists its passthrough devices.
The addresses differ from host to host, so a migration's device mapping
shows real work: ``0000:28:00.0`` on kvm-01 becomes ``0000:86:00.0`` on kvm-03.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_BRIDGE = {"class": "0x060400", "vendor_id": "0x1022", "product_id": "0x1483",
           "vendor": "AMD", "product": "GPP Bridge", "driver": "pcieport", "numa_node": 0}
_GPU = {"class": "0x030000", "vendor_id": "0x10de", "product_id": "0x2204",
        "vendor": "NVIDIA Corporation", "product": "GA102 [GeForce RTX 3090]",
        "driver": "vfio-pci", "numa_node": 1}


@dataclass(frozen=True)
class DemoHost:
    """One simulated host: its name, dual-port 10GE NICs and GPUs, each in its own group.

    The NICs sit on NUMA node 0 and the GPUs on node 1, all bound to vfio-pci.
    """

    name: str
    #: bus of each dual-port NIC (functions 0 and 1 share an IOMMU group)
    nic_buses: tuple[int, ...]
    #: bus of each GPU (function 0, alone in its IOMMU group)
    gpu_buses: tuple[int, ...]
    cpus: int = 32
    memory_mb: int = 131072

    @property
    def guid(self) -> str:
        """The guid the agent announces itself with."""
        return f"demo-{self.name}"

    def pci_devices(self) -> str:
        """The ``pci.devices`` value: ``28:00.0|10GE,28:00.1|10GE,3b:00.0|GPU``."""
        entries = [f"{bus:02x}:00.{fn}|10GE" for bus in self.nic_buses for fn in (0, 1)]
        entries += [f"{bus:02x}:00.0|GPU" for bus in self.gpu_buses]
        return ",".join(entries)

    def spec(self) -> dict[str, Any]:
        """Returns the simulated host's JSON spec: bridges, NIC functions, GPUs."""
        devices: list[dict[str, Any]] = []
        for index, bus in enumerate(self.nic_buses):
            group = 20 + index
            bridge = f"00:{3 + index:02x}.1"
            devices.append({"address": bridge, "iommu_group": group, **_BRIDGE})
            devices += [{"address": f"{bus:02x}:00.{fn}", "iommu_group": group,
                         "parent": bridge, "driver": "vfio-pci", "numa_node": 0}
                        for fn in (0, 1)]
        for index, bus in enumerate(self.gpu_buses):
            devices.append({"address": f"{bus:02x}:00.0", "iommu_group": 40 + index, **_GPU})
        return {"name": self.name, "cpus": self.cpus, "memory_mb": self.memory_mb,
                "devices": devices, "domains": []}

    def write_spec(self, directory: Path) -> str:
        """Writes the spec as ``<name>.json``; returns its ``simulated:///`` URI."""
        path = directory / f"{self.name}.json"
        path.write_text(json.dumps(self.spec(), indent=1), encoding="utf-8")
        return f"simulated://{path.resolve()}"

    def properties(self, libvirt_uri: str, amqp_url: str | None = None) -> str:
        """Returns the text of this host's ``agent.properties``."""
        lines = [f"guid={self.guid}", f"name={self.name}", f"libvirt.uri={libvirt_uri}",
                 f"pci.devices={self.pci_devices()}", "ping.interval=30s",
                 "timeout.detach=2s", "log.format=json", "log.level=info"]
        if amqp_url:
            lines.append(f"amqp.url={amqp_url}")
        return "\n".join(lines) + "\n"


#: kvm-01: two NICs and a GPU; kvm-02 and kvm-03: one NIC and a GPU each.
DEMO_HOSTS: tuple[DemoHost, ...] = (
    DemoHost("kvm-01", nic_buses=(0x28, 0x3d), gpu_buses=(0x3b,)),
    DemoHost("kvm-02", nic_buses=(0x5e,), gpu_buses=(0xaf,)),
    DemoHost("kvm-03", nic_buses=(0x86,), gpu_buses=(0xd8,)),
)
