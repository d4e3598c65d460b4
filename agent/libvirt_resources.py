"""Networks, bridges and volumes of a libvirt host, and what a migration's destination has.

``HostResources`` is mixed into ``LibvirtHost`` (it uses its ``conn``); the
test driver serves the same calls from a simulated host's node file, so
every path here runs in the tests as it runs on a real host. A VM's own
volume is a qcow2 overlay whose backing file is a base image of the same
pool: creating it copies nothing.
"""

from __future__ import annotations

import contextlib
import xml.etree.ElementTree as ET
from typing import Any

import libvirt

from hostdev.agent.errors import HypervisorError


def _reason(exc: libvirt.libvirtError) -> str:
    return exc.get_error_message() or str(exc)


def overlay_xml(name: str, base_xml: str) -> str:
    """Returns the XML of a qcow2 volume backed by the volume described by ``base_xml``."""
    base = ET.fromstring(base_xml)
    path = base.findtext("./target/path", "")
    base_format = base.find("./target/format")
    volume = ET.Element("volume")
    ET.SubElement(volume, "name").text = name
    capacity = base.find("capacity")
    ET.SubElement(volume, "capacity", {"unit": "bytes"}).text = (
        capacity.text if capacity is not None and capacity.text else "0")
    target = ET.SubElement(volume, "target")
    ET.SubElement(target, "format", {"type": "qcow2"})
    backing = ET.SubElement(volume, "backingStore")
    ET.SubElement(backing, "path").text = path
    ET.SubElement(backing, "format", {
        "type": base_format.get("type", "raw") if base_format is not None else "raw"})
    return ET.tostring(volume, encoding="unicode")


def _pool(conn: Any, pool: str) -> Any:
    try:
        return conn.storagePoolLookupByName(pool)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_POOL:
            raise HypervisorError("storage", f"storage pool {pool!r} does not exist on this "
                                  "host") from None
        raise HypervisorError("storage", _reason(exc), code=exc.get_error_code()) from None


def pool_volumes(conn: Any, pool: str) -> tuple[str, ...] | None:
    """Returns the volumes of ``pool`` on ``conn``; None when the pool does not exist."""
    try:
        found = _pool(conn, pool)
    except HypervisorError:
        return None
    with contextlib.suppress(libvirt.libvirtError):
        found.refresh(0)  # an inactive or unrefreshable pool lists what it knows
    return tuple(found.listVolumes())


def create_overlay(conn: Any, pool: str, name: str, base: str) -> None:
    """Creates volume ``name`` in ``pool`` as a qcow2 overlay of volume ``base``."""
    found = _pool(conn, pool)
    try:
        base_xml = found.storageVolLookupByName(base).XMLDesc(0)
        found.createXML(overlay_xml(name, base_xml), 0)
    except libvirt.libvirtError as exc:
        raise HypervisorError("storage", f"cannot create volume {name} on base {base} in "
                              f"pool {pool}: {_reason(exc)}", code=exc.get_error_code()) from None


class HostResources:
    """The networks, bridges, volumes and destination parts of the ``Hypervisor``."""

    conn: Any

    def networks(self) -> tuple[str, ...]:
        """Returns the names of the host's active libvirt networks."""
        return tuple(n.name() for n in self.conn.listAllNetworks(
            libvirt.VIR_CONNECT_LIST_NETWORKS_ACTIVE))

    def bridges(self) -> tuple[str, ...]:
        """Returns the names of the host's active network interfaces (bridges among them)."""
        return tuple(i.name() for i in self.conn.listAllInterfaces(
            libvirt.VIR_CONNECT_LIST_INTERFACES_ACTIVE))

    def volumes(self, pool: str) -> tuple[str, ...] | None:
        """Returns the volumes of a storage pool; None when the pool does not exist."""
        return pool_volumes(self.conn, pool)

    def create_volume(self, pool: str, name: str, base: str) -> None:
        """Creates a VM's own volume ``name``: a copy-on-write overlay of ``base``."""
        create_overlay(self.conn, pool, name, base)

    def delete_volume(self, pool: str, name: str) -> None:
        """Deletes a volume; an absent volume or pool is left alone."""
        try:
            volume = _pool(self.conn, pool).storageVolLookupByName(name)
        except (HypervisorError, libvirt.libvirtError):
            return
        try:
            volume.delete(0)
        except libvirt.libvirtError as exc:
            raise HypervisorError("storage", f"cannot delete volume {name} of pool {pool}: "
                                  f"{_reason(exc)}", code=exc.get_error_code()) from None

    def prepare_volume_at(self, destination_uri: str, pool: str, name: str,
                          base: str) -> None:
        """Makes sure the host at ``destination_uri`` has ``base`` and an overlay ``name``.

        libvirt's incremental storage migration copies into a volume that
        must exist on the destination, backed by the same base image.

        Raises:
            HypervisorError: the destination cannot be reached, or lacks the
                pool or the base image; the text says which.
        """
        try:
            conn = libvirt.open(destination_uri)
        except libvirt.libvirtError as exc:
            raise HypervisorError("storage", f"cannot reach {destination_uri} to check its "
                                  f"storage: {_reason(exc)}") from None
        try:
            volumes = pool_volumes(conn, pool)
            if volumes is None or base not in volumes:
                raise HypervisorError("storage", missing_base(destination_uri, pool, base,
                                                              volumes))
            if name not in volumes:
                create_overlay(conn, pool, name, base)
        finally:
            conn.close()


def missing_base(where: str, pool: str, base: str, volumes: tuple[str, ...] | None) -> str:
    """Says that a host lacks a base image (or its whole pool)."""
    if volumes is None:
        return f"{where} has no storage pool {pool!r} (the base image {base} lives there)"
    return f"{where} has no base image {base} in storage pool {pool!r}"


def has_domain_at(destination_uri: str, uuid: str) -> bool:
    """Opens the destination read-only and looks the domain up; unreachable is False."""
    try:
        conn = libvirt.openReadOnly(destination_uri)
    except libvirt.libvirtError:
        return False
    try:
        conn.lookupByUUIDString(uuid)
        return True
    except libvirt.libvirtError:
        return False
    finally:
        conn.close()
