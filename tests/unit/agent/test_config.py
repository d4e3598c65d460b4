"""agent.properties: parsing, defaults, every validation error, the sample file."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from hostdev.agent.config import (
    DEFAULT_PATH,
    AgentConfig,
    default_migration_uri,
    ensure_guid,
    load_config,
    parse_config,
)
from hostdev.agent.errors import ConfigError
from hostdev.messages.pci_address import PciAddress

ROOT = Path(__file__).resolve().parents[3]


def error_of(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "/etc/hostdev/agent.properties")
    return info.value


def test_defaults_apply_to_an_empty_file() -> None:
    """An empty file gives the documented defaults and no guid yet."""
    config = parse_config("", "a.properties")
    assert config.guid is None
    assert config.name == socket.gethostname()
    assert config.libvirt_uri == "qemu:///system"
    assert config.amqp_url.startswith("amqp://")
    assert config.pci_devices == ()
    assert (config.ping_interval_s, config.detach_timeout_s) == (60.0, 10.0)
    assert DEFAULT_PATH == "/etc/hostdev/agent.properties"


def test_every_key_is_parsed_in_java_properties_syntax() -> None:
    """Comments, ':' separators, whitespace and backslash continuations are honoured."""
    config = parse_config(
        "# comment\n! also a comment\n"
        "guid = 1234-abcd\n"
        "name: host-a\n"
        "amqp.url=amqps://u:p@rabbit:5671/hv;amqp://u:p@rabbit2//\n"
        "amqp.queue.type=classic\n"
        "libvirt.uri=test:///tmp/node.xml\n"
        "pci.devices = 28:00.1|10GE, \\\n"
        "    0000:28:00.2|10GE,\\\n"
        "    1:3b:00.0|GPU\n"
        "ping.interval=30s\ntimeout.attach=500ms\ntimeout.detach=2.5\n"
        "timeout.migration=5m\nlog.format=console\nlog.level=DEBUG\n",
        "a.properties")
    assert config.guid == "1234-abcd" and config.name == "host-a"
    assert config.amqp_queue_type == "classic"
    assert config.libvirt_uri == "test:///tmp/node.xml"
    assert [(e.address, e.name) for e in config.pci_devices] == [
        ("0000:28:00.1", "10GE"), ("0000:28:00.2", "10GE"), ("0001:3b:00.0", "GPU")]
    assert config.inventory[PciAddress("28:00.2")] == "10GE"
    assert (config.ping_interval_s, config.attach_timeout_s, config.detach_timeout_s,
            config.migration_timeout_s) == (30.0, 0.5, 2.5, 300.0)
    assert (config.log_format, config.log_level) == ("console", "debug")
    assert config.warnings == ()


@pytest.mark.parametrize(("entry", "wanted"), [
    ("28:00|10GE", "PCI address '28:00' is malformed"),
    ("zz:00.1|10GE", "bus 'zz' is not a hexadecimal number"),
    ("28:00.8|10GE", "function '8' is above the largest function, 0x7"),
    ("28:20.1|10GE", "slot '20' is above the largest slot, 0x1f"),
    ("28:00.1", "the entry has no '|name'"),
    ("28:00.1|", "the name after '|' is empty"),
    ("28:00.1|10 GE", "the name '10 GE' is invalid"),
    ("28:00.1|" + "x" * 65, "is invalid; expected a device name of 1 to 64 characters"),
])
def test_a_bad_device_entry_names_file_line_text_and_expectation(entry: str,
                                                                  wanted: str) -> None:
    """Each malformed pci.devices entry is an error with file, line, entry and expectation."""
    error = error_of(f"name=h\n\npci.devices=28:00.2|ok,{entry}\n")
    assert (error.path, error.line, error.text) == ("/etc/hostdev/agent.properties", 3, entry)
    assert wanted in error.expected
    assert str(error).startswith(f"/etc/hostdev/agent.properties:3: {entry!r}: ")


def test_an_error_message_says_what_a_device_entry_looks_like() -> None:
    """A missing |name error shows the expected form with an example."""
    assert "[domain:]bus:slot.function|name, e.g. 28:00.1|10GE" in error_of(
        "pci.devices=28:00.1\n").expected


@pytest.mark.parametrize("second", ["28:00.1|B", "0000:28:00.1|B", "0:28:0.1|B"])
def test_the_same_address_twice_is_an_error_also_with_and_without_domain(second: str) -> None:
    """An address listed twice, however spelled, is refused naming both spellings."""
    error = error_of(f"pci.devices=28:00.1|A,{second}\n")
    assert error.text == second
    assert "0000:28:00.1 is listed twice (also as '28:00.1|A')" in error.expected


def test_an_empty_entry_between_commas_is_an_error() -> None:
    """A doubled comma is an error, not a silently skipped device."""
    assert "an entry between commas is empty" in str(error_of("pci.devices=28:00.1|A,,28:00.2|B"))


@pytest.mark.parametrize(("line", "wanted"), [
    ("ping.interval=soon", "ping.interval must be a positive duration"),
    ("timeout.detach=0", "timeout.detach must be a positive duration"),
    ("timeout.migration=-5", "timeout.migration must be a positive duration"),
    ("log.format=xml", "log.format must be one of json, console"),
    ("log.level=loud", "log.level must be one of debug, info, warning, error"),
    ("amqp.queue.type=lazy", "amqp.queue.type must be one of quorum, classic"),
    ("amqp.url=http://rabbit", "amqp.url must be amqp://"),
    ("libvirt.uri=qemu", "libvirt.uri must be a libvirt URI"),
    ("name=my host", "name must be 1 to 64 characters"),
    ("guid=", "guid must be 1 to 64 characters"),
    ("pci.reset.on.release=yes", "pci.reset.on.release must be true or false"),
])
def test_a_bad_scalar_value_is_an_error(line: str, wanted: str) -> None:
    """Every scalar key validates its value and names the file and line."""
    error = error_of(f"# first\n{line}\n")
    assert error.line == 2
    assert wanted in error.expected


def test_an_unknown_key_is_a_warning_not_an_error() -> None:
    """A typo'd key is ignored with a warning naming it, its line and the known keys."""
    config = parse_config("pci.device=28:00.1|A\n", "a.properties")
    assert config.pci_devices == ()
    assert len(config.warnings) == 1
    assert "a.properties:1: unknown key 'pci.device'" in config.warnings[0]
    assert "pci.devices" in config.warnings[0]


def test_a_repeated_key_warns_and_the_last_one_wins() -> None:
    """Java semantics (last wins) are kept, but the repetition is reported."""
    config = parse_config("name=a\nname=b\n", "a.properties")
    assert config.name == "b"
    assert "'name' repeats line 1" in config.warnings[0]


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    """A config path that does not exist names the path and how to fix it."""
    with pytest.raises(ConfigError, match="does not exist; pass --config"):
        load_config(tmp_path / "nope.properties")


def test_the_guid_is_generated_once_and_written_back(tmp_path: Path) -> None:
    """Without a guid, one is generated, appended to the file and read back next time."""
    path = tmp_path / "agent.properties"
    path.write_text("name=h\n")
    config = ensure_guid(load_config(path))
    assert config.guid
    assert load_config(path).guid == config.guid
    assert ensure_guid(load_config(path)).guid == config.guid
    assert path.read_text().count("guid=") == 1


def test_the_sample_file_in_etc_loads_and_documents_every_key() -> None:
    """etc/agent.properties is valid and mentions every key the agent knows."""
    from hostdev.agent.config import KNOWN_KEYS

    sample = ROOT / "etc" / "agent.properties"
    config = load_config(sample)
    assert isinstance(config, AgentConfig)
    assert config.warnings == ()
    assert [e.name for e in config.pci_devices] == ["10GE", "10GE", "GPU"]
    text = sample.read_text()
    for key in KNOWN_KEYS:
        assert f"{key}=" in text, key


def test_an_error_on_a_continuation_line_names_that_line() -> None:
    """A bad entry on the third physical line of a continued pci.devices names line 3."""
    error = error_of("pci.devices=28:00.1|A,\\\n  28:00.2|B,\\\n  28:00.9|C\n")
    assert (error.line, error.text) == (3, "28:00.9|C")


def test_devices_remember_their_physical_line() -> None:
    """Each parsed entry keeps the line it was written on."""
    config = parse_config("# x\npci.devices=28:00.1|A,\\\n  28:00.2|B\n", "a.properties")
    assert [e.line for e in config.pci_devices] == [2, 3]


@pytest.mark.parametrize(("libvirt_uri", "wanted"), [
    ("qemu:///system", "qemu+tcp://kvm-01.example.org/system"),
    ("qemu+ssh://other/system", "qemu+ssh://other/system"),
    ("simulated:///tmp/a.json", "simulated:///tmp/a.json"),
    ("test:///tmp/node.xml", "test:///tmp/node.xml"),
])
def test_the_migration_uri_defaults_to_the_libvirt_uri_made_remote(libvirt_uri: str,
                                                                   wanted: str) -> None:
    """A local libvirt URI gets this host's FQDN over tcp; remote and simulated stay as is."""
    assert default_migration_uri(libvirt_uri, "kvm-01.example.org") == wanted


def test_an_explicit_migration_uri_wins() -> None:
    """migration.uri overrides the derived default."""
    config = parse_config("migration.uri=qemu+tls://h/system\n", "a.properties")
    assert config.migration_uri == "qemu+tls://h/system"
    assert parse_config("", "a").migration_uri.startswith("qemu+tcp://")


def test_state_dir_defaults_to_var_lib_or_beside_a_simulated_spec() -> None:
    """A real host keeps its state in /var/lib/hostdev-agent; a simulated one beside its spec."""
    assert parse_config("", "a").state_dir == "/var/lib/hostdev-agent"
    assert parse_config("libvirt.uri=simulated:///srv/sim/kvm-1.json\n", "a").state_dir == \
        "/srv/sim/kvm-1.agent"
    assert parse_config("state.dir=/srv/agent\n", "a").state_dir == "/srv/agent"


def test_a_relative_state_dir_is_refused_with_its_line() -> None:
    """state.dir must be absolute: the error names the file and line."""
    with pytest.raises(ConfigError, match=r"a.properties:2.*absolute directory path"):
        parse_config("name=x\nstate.dir=var/lib\n", "a.properties")


def test_a_guid_with_a_dot_is_refused_at_start_up() -> None:
    """A guid is one word of the routing keys: a dot would make every command look foreign."""
    with pytest.raises(ConfigError, match="guid must be 1 to 64 characters"):
        parse_config("guid=kvm.01\n", "/etc/hostdev/agent.properties")


def test_reset_on_release_is_off_unless_set_true() -> None:
    """pci.reset.on.release defaults to false and reads true case-insensitively."""
    assert parse_config("pci.devices=28:00.1|A\n").pci_reset_on_release is False
    assert parse_config("pci.reset.on.release=TRUE\n").pci_reset_on_release is True
