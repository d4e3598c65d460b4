"""What the hardware rules keep from offer on each host, as placement's verdicts quote it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from hostdev.mgmt.devices.device_rows import UNAVAILABLE
from hostdev.mgmt.persistence.models import PciDevice


@dataclass(frozen=True)
class Unavailable:
    """The devices of one name a hardware rule keeps from offer on a host, and why."""

    count: int
    #: Their distinct reasons, most common first.
    reasons: tuple[str, ...] = ()

    def __str__(self) -> str:
        shown = "; ".join(self.reasons[:2]) + ("; ..." if len(self.reasons) > 2 else "")
        return f"{self.count} unavailable: {shown}" if shown else f"{self.count} unavailable"


def read_unavailable(session: Session,
                     names: Sequence[str]) -> dict[int, dict[str, Unavailable]]:
    """Reads, per host and requested name, the unavailable devices and their reasons."""
    if not names:
        return {}
    found: dict[int, dict[str, list[tuple[int, str]]]] = {}
    for host_id, name, reason, number in session.execute(
            select(PciDevice.host_id, PciDevice.name, PciDevice.reason, func.count())
            .where(PciDevice.state == UNAVAILABLE, PciDevice.name.in_(list(names)))
            .group_by(PciDevice.host_id, PciDevice.name, PciDevice.reason)):
        found.setdefault(host_id, {}).setdefault(name, []).append((int(number), reason))
    return {host_id: {name: Unavailable(sum(n for n, _ in why), tuple(
                r for _, r in sorted(why, key=lambda item: (-item[0], item[1])) if r))
                      for name, why in by_name.items()}
            for host_id, by_name in found.items()}
