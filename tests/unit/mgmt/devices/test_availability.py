"""The hardware rules as a pure function: what is kept from offer, why, and what a claim takes."""

from __future__ import annotations

from dataclasses import replace

from hostdev.messages.pci_address import PciAddress as P
from hostdev.mgmt.devices.availability import (
    DeviceFacts,
    blocked,
    choose,
    has_rules,
    rule_changes,
)

NIC_0 = DeviceFacts(1, P("28:00.0"), "10GE", "free", iommu_group=40)
NIC_1 = DeviceFacts(2, P("28:00.1"), "10GE", "free", iommu_group=40)
GPU = DeviceFacts(3, P("3b:00.0"), "GPU", "free", iommu_group=41)
AUDIO = DeviceFacts(4, P("3b:00.1"), "GPU-AUDIO", "free", iommu_group=41)
PF = DeviceFacts(5, P("5e:00.0"), "PF", "free", iommu_group=60)
VF_0 = DeviceFacts(6, P("5e:02.0"), "VF", "free", iommu_group=61, physical_function=P("5e:00.0"))
VF_1 = DeviceFacts(7, P("5e:02.1"), "VF", "free", iommu_group=62, physical_function=P("5e:00.0"))
ALONE = DeviceFacts(8, P("7a:00.0"), "FPGA", "free")
HOST = (NIC_0, NIC_1, GPU, AUDIO, PF, VF_0, VF_1, ALONE)


def held(device: DeviceFacts, vm: str = "vm-a") -> DeviceFacts:
    return replace(device, state="allocated", holder=vm)


def test_a_host_of_unrelated_devices_has_no_rules() -> None:
    """Devices each alone in their group, with no PF/VF tie and none withheld, have no rules."""
    assert not has_rules([ALONE, GPU, replace(NIC_0, iommu_group=None)])
    assert has_rules([NIC_0, NIC_1])
    assert has_rules([PF, VF_0])
    assert has_rules([replace(ALONE, withheld="partial group")])
    assert not has_rules([NIC_0, replace(NIC_1, state="removed")])


def test_a_held_member_keeps_its_whole_group_from_offer() -> None:
    """One function of a group held by a VM makes the other unavailable, naming both."""
    reasons = blocked([held(NIC_0), NIC_1])
    assert reasons == {2: "IOMMU group 40: 0000:28:00.0 is held by VM vm-a"}


def test_a_disabled_member_keeps_its_group_with_the_operators_reason() -> None:
    """A disabled member blocks the others; the reason quotes why it was disabled."""
    reasons = blocked([replace(GPU, state="disabled", reason="fan broken"), AUDIO])
    assert reasons == {4: "IOMMU group 41: 0000:3b:00.0 is disabled (fan broken)"}


def test_a_vf_held_keeps_its_pf_and_a_pf_held_keeps_its_vfs() -> None:
    """PF and VF exclusion works both ways and names the device that is held."""
    assert blocked([PF, held(VF_0), VF_1]) == {5: "its VF 0000:5e:02.0 is held by VM vm-a"}
    assert blocked([held(PF, "vm-b"), VF_0, VF_1]) == {
        6: "its PF 0000:5e:00.0 is held by VM vm-b", 7: "its PF 0000:5e:00.0 is held by VM vm-b"}


def test_a_device_kept_by_its_pf_keeps_its_group_too() -> None:
    """A block by rule 2 spreads to the rest of the device's IOMMU group."""
    sibling = DeviceFacts(9, P("5e:02.2"), "OTHER", "free", iommu_group=61)
    reasons = blocked([held(PF), VF_0, sibling])
    assert reasons[9] == ("IOMMU group 61: 0000:5e:02.0 is unavailable (its PF 0000:5e:00.0 "
                          "is held by VM vm-a)")


def test_withheld_devices_are_unavailable_with_the_agents_reason() -> None:
    """A device the agent withholds is unavailable, its reason the agent's, and blocks its group."""
    why = "IOMMU group 41 has 0000:3b:00.2, which is not in pci.devices"
    reasons = blocked([replace(GPU, withheld=why), AUDIO])
    assert reasons[3] == why
    assert reasons[4].startswith("IOMMU group 41: 0000:3b:00.0 is unavailable (IOMMU group 41")


def test_a_group_holding_a_pf_and_its_own_vf_is_never_offered() -> None:
    """A PF and its VF in one group could only go to one VM together: neither is offered."""
    vf = replace(VF_0, iommu_group=60)
    reasons = blocked([PF, vf])
    assert set(reasons) == {5, 6}
    assert "holds both a PF and its VF" in reasons[5]


def test_rule_changes_free_what_no_rule_keeps_and_update_reasons() -> None:
    """Unavailable devices nothing keeps become free; changed reasons are rewritten."""
    stale = replace(NIC_1, state="unavailable", reason="IOMMU group 40: old")
    changes = rule_changes([held(NIC_0), stale, replace(GPU, state="unavailable", reason="x")])
    assert changes.unavailable == {2: "IOMMU group 40: 0000:28:00.0 is held by VM vm-a"}
    assert changes.free == (3,)
    assert rule_changes([held(NIC_0), replace(stale, reason=changes.unavailable[2])]) \
        == type(changes)()


def test_a_claim_takes_whole_groups_and_counts_them_for_their_names() -> None:
    """1x10GE takes both NIC functions; the GPU's audio function counts for GPU-AUDIO."""
    assert [d.id for d in choose(HOST, {"10GE": 1}).taken] == [1, 2]
    assert [d.id for d in choose(HOST, {"10GE": 2}).taken] == [1, 2]
    assert [d.id for d in choose(HOST, {"GPU": 1, "GPU-AUDIO": 1}).taken] == [3, 4]


def test_a_claim_never_takes_a_pf_with_its_vf() -> None:
    """Asked for a PF and a VF of it, the claim is short; VFs are taken before PFs."""
    assert choose(HOST, {"PF": 1, "VF": 1}).short == ("VF", 1, 2)
    shared = [PF, replace(VF_0, name="PF"), replace(VF_1, name="PF")]
    assert [d.id for d in choose(shared, {"PF": 2}).taken] == [6, 7]
    assert choose(shared, {"PF": 3}).short == ("PF", 3, 3)


def test_a_claim_skips_groups_with_a_member_not_free() -> None:
    """A free device whose group mate is held is not taken (it should be unavailable anyway)."""
    assert choose([held(NIC_0), NIC_1], {"10GE": 1}).short == ("10GE", 1, 1)
    assert choose(HOST, {"FPGA": 2}).short == ("FPGA", 2, 1)


def test_a_claim_on_one_numa_node_counts_only_that_nodes_devices() -> None:
    """With a NUMA node, devices elsewhere are not taken, and nodeless ones count as NO_NODE."""
    on_0 = [replace(NIC_0, numa_node=0), replace(NIC_1, numa_node=0)]
    on_1 = replace(ALONE, name="10GE", numa_node=1)
    assert [d.id for d in choose([*on_0, on_1], {"10GE": 1}, numa_node=1).taken] == [8]
    assert [d.id for d in choose([*on_0, on_1], {"10GE": 2}, numa_node=0).taken] == [1, 2]
    assert choose([*on_0, on_1], {"10GE": 2}, numa_node=1).short == ("10GE", 2, 1)
    assert [d.id for d in choose([NIC_0, NIC_1], {"10GE": 1}, numa_node=-1).taken] == [1, 2]
