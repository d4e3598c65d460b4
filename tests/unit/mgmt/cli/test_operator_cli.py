"""The operator commands of ``hostdev`` against a service on SQLite (no broker)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostdev.messages import api
from hostdev.messages.base import Message
from hostdev.messages.codec import decode, encode
from hostdev.messages.commands import ErrorAnswer
from hostdev.messages.errors import BusError, RemoteError, RequestTimeout
from hostdev.messages.pci_address import PciAddress
from hostdev.messages.values import PciDeviceInfo
from hostdev.mgmt.cli import build_parser
from hostdev.mgmt.cli.plumbing import expect, render_table
from hostdev.mgmt.persistence.database import create_database_engine
from tests.support.databases import sqlite_database
from tests.support.mgmt_harness import Harness, devices


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    """A service with h1 (2 x 10GE) and h2 (1 x 10GE) and offering net2 = 10GE,10GE."""
    with sqlite_database(tmp_path) as url:
        engine = create_database_engine(url)
        harness = Harness(engine)
        harness.register("g1", "h1", devices(2))
        harness.register("g2", "h2", devices(1))
        harness.api(api.CreateOfferingRequest(name="net2", pci_devices="10GE:2"))
        yield harness
        engine.dispose()


def _cli(h: Harness, *argv: str, answer_jobs: bool = False) -> tuple[int, str]:
    """Runs ``hostdev ARGV`` with requests answered by the harness's service."""
    def request(message: Message, timeout: float) -> Message:
        if answer_jobs and isinstance(message, api.GetJobRequest):
            h.answer()
        answer = h.api(decode(encode(message)))
        if isinstance(answer, ErrorAnswer):
            raise RemoteError(f"{type(message).__name__} (message_id x) failed remotely "
                              f"[{answer.code}]: {answer.details}", code=answer.code)
        return answer

    args = build_parser().parse_args(list(argv))
    out = io.StringIO()
    status: int = args.func(args, requester=request, out=out)
    return status, out.getvalue()


def test_hosts_table_and_json(h: Harness) -> None:
    """`hostdev hosts` prints a table; with --json, a list of objects."""
    status, text = _cli(h, "hosts")
    assert status == 0
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["NAME", "GUID", "STATUS"]
    assert lines[1].split()[:3] == ["h1", "g1", "Up"] and "2/2" in lines[1]
    status, text = _cli(h, "hosts", "--json")
    assert [row["name"] for row in json.loads(text)] == ["h1", "h2"]


def test_deploy_wait_then_devices_show_the_holder(h: Harness) -> None:
    """`vm deploy --wait` returns when the VM runs; `devices --host h1` shows its devices."""
    status, text = _cli(h, "vm", "deploy", "web1", "--offering", "net2", "--wait",
                        answer_jobs=True)
    assert status == 0 and "succeeded" in text
    status, text = _cli(h, "devices", "--host", "h1", "--json")
    rows = json.loads(text)
    assert {row["state"] for row in rows} == {"allocated"} and len(rows) == 2
    status, text = _cli(h, "vm", "list")
    assert "web1" in text and "Running" in text


def test_no_capacity_error_is_one_clear_line(h: Harness,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """A refused deploy exits 1 and prints why each host cannot take it."""
    _cli(h, "vm", "deploy", "web1", "--offering", "net2")
    status, _ = _cli(h, "vm", "deploy", "web2", "--offering", "net2")
    assert status == 1
    assert capsys.readouterr().err == ("error: no host has 2 x 10GE free: h1 has 0, "
                                       "h2 has 1\n")


def test_explain_and_offerings(h: Harness) -> None:
    """`explain` gives a verdict per host; `offerings` shows the short PCI form."""
    status, text = _cli(h, "explain", "net2")
    assert status == 0
    assert "h2" in text and "needs 2x10GE, 1 free" in text
    status, text = _cli(h, "offerings")
    assert "net2" in text and "10GE:2" in text


def test_offering_create_refuses_unknown_names(h: Harness,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """`offering create --pci 40GE` fails naming the device names that exist."""
    status, _ = _cli(h, "offering", "create", "big", "--pci", "40GE")
    assert status == 1
    assert "names that exist: 10GE" in capsys.readouterr().err


def test_timeout_says_what_to_check(h: Harness, capsys: pytest.CaptureFixture[str]) -> None:
    """A request nobody answers tells the person to check the daemon and broker."""
    def request(message: Message, timeout: float) -> Message:
        raise RequestTimeout("no answer to ListHostsRequest within 10 s")

    args = build_parser().parse_args(["hosts"])
    assert args.func(args, requester=request, out=io.StringIO()) == 1
    assert "is hostdev-mgmt running" in capsys.readouterr().err


def test_render_table_marks_empty_cells() -> None:
    """Empty cells print as '-', and an empty table says (none)."""
    out = io.StringIO()
    render_table(("A", "B"), [("x", None)], out)
    render_table(("A",), [], out)
    assert out.getvalue() == "A  B\nx  -\nA\n(none)\n"


def test_an_answer_of_another_type_is_a_clear_error() -> None:
    """An unexpected answer type says what came, what was expected and the likely cause."""
    with pytest.raises(BusError, match="answered VmList where HostList was expected; are "
                                       "the hostdev CLI and hostdev-mgmt the same version"):
        expect(api.VmList(), api.HostList)


def _facts_host(h: Harness) -> None:
    """Registers h3: a PF on NUMA node 1 with one VF, in group 7 with an unlisted function."""
    h.register("g3", "h3", (
        PciDeviceInfo(address=PciAddress("5e:00.0"), name="pf", iommu_group=7, numa_node=1,
                      iommu_members=(PciAddress("5e:00.0"), PciAddress("5e:00.1")),
                      virtual_functions=(PciAddress("5e:02.0"),), driver="i40e",
                      vendor="Intel Corporation", product="X710", class_code=0x020000),
        PciDeviceInfo(address=PciAddress("5e:02.0"), name="vf", iommu_group=8, numa_node=1,
                      iommu_members=(PciAddress("5e:02.0"),),
                      physical_function=PciAddress("5e:00.0"), driver="vfio-pci"),
    ))


def test_devices_show_numa_group_and_sriov_columns(h: Harness) -> None:
    """`devices` shows the NUMA node, the group with its size, and the PF/VF relation."""
    _facts_host(h)
    status, text = _cli(h, "devices", "--host", "h3")
    assert status == 0
    lines = text.splitlines()
    assert lines[0].split() == ["HOST", "ADDRESS", "NAME", "STATE", "VM", "NUMA", "GROUP",
                                "PF/VF", "REASON"]
    assert lines[1].split() == ["h3", "0000:5e:00.0", "pf", "free", "-", "1", "7", "(2)",
                                "PF,", "1", "VFs", "-"]
    assert lines[2].split() == ["h3", "0000:5e:02.0", "vf", "free", "-", "1", "8", "(1)",
                                "VF", "of", "0000:5e:00.0", "-"]


def test_devices_and_explain_say_why_a_device_is_unavailable(h: Harness) -> None:
    """A disabled NIC function keeps its group mate off offer: devices and explain say why."""
    mates = tuple(PciDeviceInfo(address=PciAddress(f"28:00.{n}"), name="25GE", iommu_group=40)
                  for n in (0, 1))
    h.register("g4", "h4", mates)
    assert _cli(h, "device", "disable", "h4", "28:00.1", "--reason", "bad SFP")[0] == 0
    status, text = _cli(h, "devices", "--host", "h4")
    assert status == 0
    why = "IOMMU group 40: 0000:28:00.1 is disabled (bad SFP)"
    first = text.splitlines()[1]
    assert first.split()[:4] == ["h4", "0000:28:00.0", "25GE", "unavailable"]
    assert first.endswith(why)
    h.api(api.CreateOfferingRequest(name="net25", pci_devices="25GE"))
    status, text = _cli(h, "explain", "net25")
    assert status == 0
    assert f"needs 1x25GE, 0 free (1 unavailable: {why})" in text


def test_devices_json_carries_every_fact(h: Harness) -> None:
    """`devices --json` lists the reported facts of each device."""
    _facts_host(h)
    status, text = _cli(h, "devices", "--host", "h3", "--json")
    assert status == 0
    pf, vf = json.loads(text)
    assert {k: pf[k] for k in ("numa_node", "iommu_group", "iommu_members", "driver",
                               "virtual_functions", "physical_function", "vendor",
                               "product", "class_code")} == {
        "numa_node": 1, "iommu_group": 7, "iommu_members": ["0000:5e:00.0", "0000:5e:00.1"],
        "driver": "i40e", "virtual_functions": ["0000:5e:02.0"], "physical_function": None,
        "vendor": "Intel Corporation", "product": "X710", "class_code": 0x020000}
    assert (vf["physical_function"], vf["virtual_functions"]) == ("0000:5e:00.0", [])


def test_device_disable_keeps_the_reason_and_enable_clears_it(h: Harness) -> None:
    """`device disable --reason` takes a device off offer with the reason; enable undoes it."""
    status, text = _cli(h, "device", "disable", "h2", "28:00.0", "--reason", "fan noise")
    assert status == 0
    assert "disabled" in text and "fan noise" in text
    status, text = _cli(h, "devices", "--host", "h2", "--json")
    assert [(r["state"], r["reason"]) for r in json.loads(text)] == [
        ("disabled", "fan noise")]
    status, text = _cli(h, "device", "enable", "h2", "0000:28:00.0", "--json")
    assert status == 0
    assert (json.loads(text)["state"], json.loads(text)["reason"]) == ("free", "")


def test_device_disable_is_refused_while_held_naming_the_vm(
        h: Harness, capsys: pytest.CaptureFixture[str]) -> None:
    """A device a VM holds cannot be disabled; the error names the VM."""
    status, _ = _cli(h, "vm", "deploy", "web1", "--offering", "net2", "--wait",
                     answer_jobs=True)
    assert status == 0
    status, _ = _cli(h, "device", "disable", "h1", "28:00.0")
    assert status == 1
    err = capsys.readouterr().err
    assert "0000:28:00.0" in err and "allocated by VM web1 (" in err
    status, text = _cli(h, "devices", "--host", "h1", "--json")
    assert {r["state"] for r in json.loads(text)} == {"allocated"}


def test_offering_numa_policy_is_shown_and_a_vm_lists_its_node(h: Harness) -> None:
    """`offering create --numa-policy` shows the policy; `vm list` shows the VM's node."""
    h.register("g4", "h4", tuple(
        PciDeviceInfo(address=PciAddress(f"d8:00.{n}"), name="GPU", numa_node=1)
        for n in range(2)))
    status, text = _cli(h, "offering", "create", "gpu2", "--pci", "GPU:2",
                        "--numa-policy", "required")
    header, row = text.splitlines()
    columns = dict(zip(header.split(), row.split(), strict=False))  # TEMPLATE is empty
    assert status == 0 and columns["NUMA"] == "required"
    status, text = _cli(h, "offerings", "--json")
    assert {o["name"]: o["numa_policy"] for o in json.loads(text)} == {
        "net2": "none", "gpu2": "required"}
    status, _ = _cli(h, "vm", "deploy", "ml1", "--offering", "gpu2", "--wait", answer_jobs=True)
    assert status == 0
    status, text = _cli(h, "vm", "list")
    header, row = text.splitlines()
    assert (header.split()[-1], row.split()[0], row.split()[-1]) == ("NUMA", "ml1", "1")
    status, text = _cli(h, "vm", "list", "--json")
    assert [v["numa_node"] for v in json.loads(text)] == [1]
