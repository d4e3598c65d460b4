"""A persistent simulated host's state file: its domains and VMs' volumes, beside its spec.

A host whose URI names a spec file keeps what its agent defined in
``<name>.state.json``, so the domains outlive the agent process (as they
outlive an agent on a real host) and are there again when it restarts.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from hostdev.agent.errors import ConfigError
from hostdev.agent.nodedev_xml import TEST_NS

#: The test driver's run state of a domain that is shut off.
RUNSTATE_SHUTOFF = "5"


def state_path(spec_path: str | Path) -> Path:
    """Returns where a persistent simulated host keeps its domains: next to its spec."""
    path = Path(spec_path)
    return path.with_name(f"{path.stem}.state.json")


def load_state(path: Path) -> tuple[list[dict[str, Any]], dict[str, list[str]]]:
    """Reads the saved domains (``[{"xml": ..., "running": bool}]``) and VMs' own volumes.

    Volumes are volume XMLs by pool; none of either without the file.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return [], {}
    except ValueError as exc:
        raise ConfigError(str(path), 0, str(path), f"not a simulated-host state file ({exc}); "
                          "delete it to start from the spec's domains") from None
    domains: list[dict[str, Any]] = data["domains"]
    volumes: dict[str, list[str]] = data.get("volumes", {})
    return domains, volumes


def node_xml_with(node_xml: str, saved: list[dict[str, Any]],
                   volumes: dict[str, list[str]]) -> str:
    """Appends saved domains and volumes to a node XML; a stopped domain is shut off."""
    node = ET.fromstring(node_xml)
    for pool in node.findall("pool"):
        for volume in volumes.get(pool.findtext("name", ""), ()):
            pool.append(ET.fromstring(volume))
    for entry in saved:
        domain = ET.fromstring(entry["xml"])
        domain.attrib.pop("id", None)
        if not entry["running"]:
            ET.SubElement(domain, f"{{{TEST_NS}}}runstate").text = RUNSTATE_SHUTOFF
        node.append(domain)
    return ET.tostring(node, encoding="unicode")
