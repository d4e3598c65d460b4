"""What a domain needs from its host: networks, bridges, base images, its own volumes.

Checked before anything is created, so a refused start leaves nothing
behind; the VM's own volumes are made just before define and, when the
start fails after all, removed again by the caller (``remove_volumes``).
"""

from __future__ import annotations

import structlog

from hostdev.agent.domain_xml import OwnVolume
from hostdev.agent.errors import HypervisorError
from hostdev.agent.hypervisor import Hypervisor
from hostdev.agent.libvirt_resources import missing_base
from hostdev.messages.domain_template import DomainNeeds

log = structlog.get_logger()


def _listed(names: tuple[str, ...]) -> str:
    return ", ".join(sorted(names)) or "none"


def host_refusal(hypervisor: Hypervisor, needs: DomainNeeds) -> str | None:
    """Says what the host lacks for a domain (a network, bridge, pool or base image), or None."""
    problems: list[str] = []
    if needs.networks:
        networks = hypervisor.networks()
        problems += [f"libvirt network {n!r} does not exist or is not active on this host "
                     f"(active networks: {_listed(networks)})"
                     for n in needs.networks if n not in networks]
    if needs.bridges:
        bridges = hypervisor.bridges()
        problems += [f"bridge {b!r} does not exist on this host (interfaces: "
                     f"{_listed(bridges)})" for b in needs.bridges if b not in bridges]
    pools: dict[str, tuple[str, ...] | None] = {}
    for image in needs.base_images:
        if image.pool not in pools:
            pools[image.pool] = hypervisor.volumes(image.pool)
        volumes = pools[image.pool]
        if volumes is None or image.volume not in volumes:
            problems.append(missing_base("this host", image.pool, image.volume, volumes))
    return "; ".join(problems) or None


def own_volumes(needs: DomainNeeds, vm_uuid: str) -> tuple[OwnVolume, ...]:
    """Returns the VM's own volumes for a domain's base images."""
    return tuple(OwnVolume(pool=i.pool, volume=i.own_volume(vm_uuid), base=i.volume)
                 for i in needs.base_images)


def create_volumes(hypervisor: Hypervisor, volumes: tuple[OwnVolume, ...]) -> list[OwnVolume]:
    """Creates the volumes that do not exist yet (a stopped VM keeps its own); returns them.

    Raises:
        HypervisorError: one could not be created; those created before it
            are removed again.
    """
    created: list[OwnVolume] = []
    for volume in volumes:
        if volume.volume in (hypervisor.volumes(volume.pool) or ()):
            continue
        try:
            hypervisor.create_volume(volume.pool, volume.volume, volume.base)
        except HypervisorError:
            remove_volumes(hypervisor, created)
            raise
        created.append(volume)
        log.info("volume_created", pool=volume.pool, volume=volume.volume, base=volume.base)
    return created


def remove_volumes(hypervisor: Hypervisor, volumes: list[OwnVolume] | tuple[OwnVolume, ...]
                   ) -> list[str]:
    """Deletes volumes, going on past failures; returns what failed, for the answer."""
    failures: list[str] = []
    for volume in volumes:
        try:
            hypervisor.delete_volume(volume.pool, volume.volume)
            log.info("volume_deleted", pool=volume.pool, volume=volume.volume)
        except HypervisorError as exc:
            failures.append(str(exc))
            log.error("volume_delete_failed", pool=volume.pool, volume=volume.volume,
                      error=str(exc))
    return failures
