"""LibvirtHost's networks, bridges and volumes on the test driver, reached by test:/// URIs."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostdev.agent.errors import HypervisorError
from hostdev.agent.libvirt_host import LibvirtHost
from hostdev.agent.libvirt_resources import overlay_xml
from hostdev.agent.nodedev_xml import SimHostSpec, build_node_xml

pytestmark = pytest.mark.libvirt

BASE = "debian-12.qcow2"


def _node(tmp_path: Path, name: str, volumes: tuple[str, ...]) -> str:
    """Writes a test-driver node file with network default, bridge br0, pool images."""
    path = tmp_path / f"{name}.xml"
    path.write_text(build_node_xml(SimHostSpec(name=name, networks=("default",),
                                               bridges=("br0",), pools={"images": volumes})),
                    encoding="utf-8")
    return f"test://{path}"


@pytest.fixture
def host(tmp_path: Path) -> Iterator[LibvirtHost]:
    opened = LibvirtHost(_node(tmp_path, "here", (BASE,)))
    opened.open()
    yield opened
    opened.close()


def test_networks_bridges_and_volumes_are_listed(host: LibvirtHost) -> None:
    """The host's active networks and interfaces, and a pool's volumes; no pool is None."""
    assert host.networks() == ("default",) and host.bridges() == ("br0",)
    assert host.volumes("images") == (BASE,) and host.volumes("nope") is None


def test_an_own_volume_is_a_qcow2_overlay_of_its_base(host: LibvirtHost) -> None:
    """The created volume is qcow2 and backed by the base's path; delete removes it."""
    host.create_volume("images", "vm-vda.qcow2", BASE)
    pool = host.conn.storagePoolLookupByName("images")
    xml = pool.storageVolLookupByName("vm-vda.qcow2").XMLDesc(0)
    assert "<format type='qcow2'/>" in xml
    assert f"<path>/simulated/here/images/{BASE}</path>" in xml.split("<backingStore>")[1]
    host.delete_volume("images", "vm-vda.qcow2")
    host.delete_volume("images", "vm-vda.qcow2")  # absent: left alone
    assert host.volumes("images") == (BASE,)


def test_an_overlay_of_a_missing_base_fails_naming_it(host: LibvirtHost) -> None:
    """Creating on a base the pool lacks raises with the volume, base and pool."""
    with pytest.raises(HypervisorError, match=re.escape(
            "cannot create volume v.qcow2 on base nope in pool images")):
        host.create_volume("images", "v.qcow2", "nope")


def test_the_destination_check_opens_the_destination_uri(host: LibvirtHost,
                                                         tmp_path: Path) -> None:
    """A destination without the base is refused naming it; one with it passes."""
    lacking = _node(tmp_path, "there", ())
    with pytest.raises(HypervisorError, match=re.escape(
            f"{lacking} has no base image {BASE} in storage pool 'images'")):
        host.prepare_volume_at(lacking, "images", "vm-vda.qcow2", BASE)
    host.prepare_volume_at(_node(tmp_path, "ready", (BASE,)), "images", "vm-vda.qcow2", BASE)


def test_overlay_xml_keeps_the_base_s_size_and_format() -> None:
    """Capacity and the base's format (raw here) carry over; the overlay is qcow2."""
    base = ("<volume><name>b</name><capacity unit='bytes'>1073741824</capacity>"
            "<target><path>/p/b.img</path><format type='raw'/></target></volume>")
    xml = overlay_xml("o", base)
    assert "<capacity unit=\"bytes\">1073741824</capacity>" in xml
    assert "<backingStore><path>/p/b.img</path><format type=\"raw\" /></backingStore>" in xml
