"""libvirt's lifecycle event, detail and state numbers, in the words hostdev reports."""

from __future__ import annotations

import libvirt

from hostdev.messages.base import PowerState

EVENTS = ("Defined", "Undefined", "Started", "Suspended", "Resumed", "Stopped", "Shutdown",
           "PMSuspended", "Crashed")
DETAILS: dict[str, tuple[str, ...]] = {
    "Defined": ("Added", "Updated", "Renamed", "Snapshot"),
    "Undefined": ("Removed", "Renamed"),
    "Started": ("Booted", "Migrated", "Restored", "Snapshot", "Wakeup"),
    "Stopped": ("Shutdown", "Destroyed", "Crashed", "Migrated", "Saved", "Failed", "Snapshot"),
    "Shutdown": ("Finished", "Guest", "Host"),
}
STATES: dict[int, PowerState] = {
    libvirt.VIR_DOMAIN_NOSTATE: "unknown", libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "running", libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "running", libvirt.VIR_DOMAIN_SHUTOFF: "stopped",
    libvirt.VIR_DOMAIN_CRASHED: "crashed", libvirt.VIR_DOMAIN_PMSUSPENDED: "paused",
}
EVENT_STATES: dict[str, PowerState] = {
    "Started": "running", "Resumed": "running", "Suspended": "paused", "PMSuspended": "paused",
    "Stopped": "stopped", "Undefined": "stopped", "Crashed": "crashed",
}
