"""``hostdev-agent``: the host agent daemon.

Start-up order: read and validate ``agent.properties`` (a bad value stops here,
before anything is contacted), open libvirt, run the start-up checks, connect
the bus, declare ``hostdev.agent.<guid>``, announce with
``StartupRoutingCommand``, then ping every ``ping.interval`` and push a
``VmStateReport`` when lifecycle events change what management was told
(``hostdev.agent.vm_reports``). After a reconnect the agent
announces itself again. ``--check`` validates the file and the host and exits
0 or 1, like ``nginx -t``.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import structlog

from hostdev.agent.background import BackgroundCommands
from hostdev.agent.boot_sequence import BootSequence
from hostdev.agent.config import DEFAULT_PATH, AgentConfig, ensure_guid, load_config
from hostdev.agent.errors import AgentError, ConfigError, HypervisorError
from hostdev.agent.handlers import CommandHandlers, Timeouts
from hostdev.agent.hypervisor import Hypervisor, LifecycleEvent
from hostdev.agent.lab_host import LabHost
from hostdev.agent.libvirt_host import LibvirtHost
from hostdev.agent.metrics import serve_agent_metrics
from hostdev.agent.pipeline import CommandPipeline
from hostdev.agent.recent_commands import FILE_NAME, RecentCommands
from hostdev.agent.simulated import SimulatedHost, is_simulated_uri
from hostdev.agent.startup_checks import CheckReport, check_host
from hostdev.agent.vm_reports import LifecycleReports
from hostdev.messages.base import Message
from hostdev.messages.bus.contract import BusLike, Handler
from hostdev.messages.codec import domains_digest
from hostdev.messages.commands import (
    AttachPciDevicesCommand,
    DetachPciDevicesCommand,
    ErrorAnswer,
    MigrateCommand,
    PingRoutingCommand,
    ResetPciDevicesCommand,
    StartCommand,
    StartupAnswer,
    StartupRoutingCommand,
    StopCommand,
)
from hostdev.messages.errors import BusError
from hostdev.messages.pci_address import PciAddress
from hostdev.messages.runtime.backoff import Backoff, retry
from hostdev.messages.runtime.logging import configure_logging
from hostdev.messages.runtime.sd_notify import SystemdNotifier

log = structlog.get_logger()

#: How often the agent checks whether to announce itself again, at most.
_ANNOUNCE_TICK_S = 0.5


@dataclass
class _Announcing:
    """Where the agent is in announcing itself: answered yet, and when to try again."""

    answered: bool = False
    retries: int = 0
    remaining_s: float = 0.0


def open_hypervisor(uri: str, stand_in_for: Iterable[PciAddress] | None = None) -> Hypervisor:
    """Returns the hypervisor for a ``libvirt.uri``: simulated for simulated:// and test://.

    With ``stand_in_for`` (``lab.emulated.devices``), a ``LabHost`` giving
    guests emulated stand-ins for those addresses; lab only.
    """
    host: Hypervisor = (LabHost(uri, stand_in_for) if stand_in_for is not None
                        else SimulatedHost(uri) if is_simulated_uri(uri) else LibvirtHost(uri))
    host.open()
    return host


def _stand_ins(config: AgentConfig) -> Iterable[PciAddress] | None:
    return config.inventory if config.lab_emulated_devices else None


def _agent_version() -> str:
    try:
        return metadata.version("hostdev")
    except metadata.PackageNotFoundError:
        return ""


class Agent:
    """Ties a ``Hypervisor`` to the bus: announces, pings, reports, handles commands."""

    def __init__(self, config: AgentConfig, hypervisor: Hypervisor, bus: BusLike,
                 report: CheckReport, *, notifier: SystemdNotifier | None = None,
                 announce_backoff: Backoff | None = None) -> None:
        if config.guid is None:
            raise AgentError("the agent needs a guid; call ensure_guid(config) first")
        self.guid: str = config.guid
        self.config = config
        self.hypervisor = hypervisor
        self.bus = bus
        self.report = report
        self.notifier = notifier or SystemdNotifier()
        self.commands = CommandHandlers(
            hypervisor, config.inventory,
            Timeouts(attach_s=config.attach_timeout_s, detach_s=config.detach_timeout_s,
                     migration_s=config.migration_timeout_s))
        self.announcements = 0
        # Until a StartupAnswer arrives the announcement is repeated: management
        # may start after the agent, and an unroutable announcement is lost.
        self.announce_backoff = announce_backoff or Backoff(first_s=1.0, max_s=30.0)
        self._announcing = _Announcing()
        #: Numbers every report and answer of this process (management orders them).
        self.sequence = BootSequence()
        # Answers repeats of a command (outbox re-publication), also across a restart.
        recent = RecentCommands(path=Path(config.state_dir) / FILE_NAME)
        self.background = BackgroundCommands(bus, self.guid, recent)
        self.pipeline = CommandPipeline(self.guid, recent, self.background,
                                        self.sequence)
        #: Lifecycle events to ``VmStateReport``: coalesced, sent on change only.
        self.reports = LifecycleReports(self.guid, hypervisor, bus, self.sequence)

    # -- outgoing ------------------------------------------------------------------

    def startup_message(self) -> StartupRoutingCommand:
        """Builds the announcement: host facts, the checked inventory, the domains."""
        seq = self.sequence.take()  # before libvirt is read (hostdev.agent.boot_sequence)
        facts = self.hypervisor.facts()
        return StartupRoutingCommand(
            guid=self.guid, name=self.config.name, hypervisor=facts.hypervisor,
            hypervisor_version=facts.hypervisor_version, cpus=facts.cpus,
            memory_mb=facts.memory_mb, pci_devices=self.report.inventory,
            domains=self.hypervisor.domains(), agent_version=_agent_version(),
            migration_uri=self.config.migration_uri, boot_id=self.sequence.boot_id, seq=seq,
            pci_reset_on_release=self.config.pci_reset_on_release)

    @property
    def registered(self) -> bool:
        """True once management answered the latest round of announcements."""
        return self._announcing.answered

    def announce(self) -> None:
        """Starts a round of announcements (at start and after every reconnect).

        ``StartupRoutingCommand`` is sent now and again, with growing delays
        (``announce_backoff``), until a ``StartupAnswer`` arrives.
        """
        self._announcing = _Announcing()
        # What the old connection carried may be lost: report every change again.
        self.reports.forget()
        self._send_announcement()

    def _send_announcement(self) -> None:
        state = self._announcing
        state.remaining_s = self.announce_backoff.delay(state.retries)
        try:
            message = self.startup_message()
        except HypervisorError as exc:
            log.error("announce_failed", host=self.guid, error=str(exc),
                      retry_in_s=round(state.remaining_s, 2))
            return
        self.bus.send_to_mgmt(self.guid, message)
        self.announcements += 1
        log.info("agent_announced", host=self.guid, devices=len(message.pci_devices),
                 domains=len(message.domains), attempt=state.retries + 1)

    def _announce_tick(self) -> None:
        state = self._announcing
        if state.answered:
            return
        state.remaining_s -= _ANNOUNCE_TICK_S
        if state.remaining_s > 0:
            return
        state.retries += 1
        log.warning("startup_unanswered", host=self.guid, attempts=state.retries,
                    hint="no StartupAnswer yet: is hostdev-mgmt running on this broker?")
        self._send_announcement()

    def ping(self) -> None:
        """Sends ``PingRoutingCommand`` with every domain's state and hostdevs."""
        seq = self.sequence.take()  # before libvirt is read (hostdev.agent.boot_sequence)
        try:
            domains = self.hypervisor.domains()
        except HypervisorError as exc:
            log.error("ping_skipped", host=self.guid, error=str(exc))
            return
        self.bus.send_to_mgmt(self.guid, PingRoutingCommand(
            guid=self.guid, domains=domains, boot_id=self.sequence.boot_id, seq=seq,
            domains_digest=domains_digest(domains)))

    def on_lifecycle(self, event: LifecycleEvent) -> None:
        """Hands a libvirt event (event thread) to the bus loop thread, coalesced per domain."""
        self.reports.on_event(event)

    # -- incoming ------------------------------------------------------------------

    def _startup_answer(self, message: StartupAnswer) -> None:
        # A refusal ends the round too: the same announcement would be refused again.
        self._announcing.answered = True
        if message.ok:
            log.info("startup_accepted", host=self.guid, host_id=message.host_id,
                     ping_interval_s=message.ping_interval_s)
        else:
            log.error("startup_refused", host=self.guid, details=message.details)
        return None

    def _error_answer(self, message: ErrorAnswer) -> None:
        # Management refused something the agent sent and dead-lettered it
        # already; logging it (once) and acking is all that is left to do.
        log.warning("error_answer_received", host=self.guid, code=message.code,
                    details=message.details)

    def handlers(self) -> dict[type[Message], Handler]:
        """Returns the bus handlers by message type, each through the pipeline."""
        pipeline = self.pipeline
        return {
            # A started VM's lifecycle report would repeat its answer: not sent.
            StartCommand: pipeline.command(
                lambda command: self.reports.answered(self.commands.start(command))),
            StopCommand: pipeline.command(self.commands.stop),
            # Long: on a worker thread, so the loop keeps the heartbeats going.
            MigrateCommand: pipeline.long_command(self.commands.migrate,
                                                  key=lambda m: m.vm_uuid),
            AttachPciDevicesCommand: pipeline.command(self.commands.attach),
            DetachPciDevicesCommand: pipeline.command(self.commands.detach),
            ResetPciDevicesCommand: pipeline.command(self.commands.reset),
            StartupAnswer: pipeline.answer(self._startup_answer),
            ErrorAnswer: pipeline.answer(self._error_answer),
        }

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        """Connects, declares the queue, consumes, announces, and schedules pings."""
        self.bus.connect()
        queue = self.bus.declare_agent_queue(self.guid)
        self.bus.consume(queue, self.handlers())
        self.bus.on_reconnect(self.announce)
        self.hypervisor.set_lifecycle_listener(self.on_lifecycle)
        self.announce()
        self.bus.call_every(_ANNOUNCE_TICK_S, self._announce_tick)
        self.bus.call_every(self.config.ping_interval_s, self.ping)
        watchdog = self.notifier.watchdog_interval_s()
        if watchdog:
            self.bus.call_every(watchdog, self._pet_watchdog)
        self.notifier.ready(f"announced as {self.guid}")

    def _pet_watchdog(self) -> None:
        self.notifier.watchdog()

    def run(self) -> None:
        """Starts and runs the bus loop until ``stop()``."""
        self.start()
        try:
            self.bus.run()
        finally:
            self.notifier.notify("STOPPING=1")
            self.hypervisor.set_lifecycle_listener(None)
            self.bus.close()
            self.hypervisor.close()

    def stop(self) -> None:
        """Asks the loop to return after the message in hand (thread- and signal-safe)."""
        self.bus.stop()


def _log_report(report: CheckReport) -> None:
    for warning in report.warnings:
        log.warning("startup_check_warning", problem=warning)
    for use in report.in_use:
        log.info("pci_device_in_use", address=use.address, name=use.name,
                 vm=use.domain.uuid, vm_name=use.domain.name, state=use.domain.state)
    for error in report.errors:
        log.error("startup_check_failed", problem=error)
    for refused in report.partial_groups:
        log.warning("pci_devices_withheld", problem=refused)


def check(config: AgentConfig) -> int:
    """Validates the host against the configuration and prints the verdict (``--check``)."""
    out = sys.stderr
    print(f"hostdev-agent: the configuration file {config.path} syntax is ok", file=out)
    if config.guid is not None:
        print(f"hostdev-agent: guid {config.guid}", file=out)
    else:
        print(f"hostdev-agent: guid not set: the first start writes a generated one into "
              f"{config.path}; set guid= yourself (e.g. `cat /proc/sys/kernel/random/uuid`) "
              "to create the host's broker user (hostdev-mgmt rabbitmq-user add GUID) first",
              file=out)
    for warning in config.warnings:
        print(f"hostdev-agent: warning: {warning}", file=out)
    try:
        host = open_hypervisor(config.libvirt_uri, _stand_ins(config))
    except AgentError as exc:
        print(f"hostdev-agent: {exc}", file=out)
        print(f"hostdev-agent: the configuration file {config.path} test failed", file=out)
        return 1
    try:
        report = check_host(config, host.pci_devices(), host.domains(), host.pci_backends())
    finally:
        host.close()
    for warning in report.warnings:
        print(f"hostdev-agent: warning: {warning}", file=out)
    for use in report.in_use:
        print(f"hostdev-agent: note: {use}", file=out)
    for error in (*report.errors, *report.partial_groups):
        print(f"hostdev-agent: error: {error}", file=out)
    verdict = "is successful" if report.passes else "failed"
    print(f"hostdev-agent: {len(report.inventory)} of {len(config.pci_devices)} devices found "
          f"on {config.libvirt_uri}; the configuration file {config.path} test {verdict}",
          file=out)
    return 0 if report.passes else 1


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hostdev-agent", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=DEFAULT_PATH,
                        help=f"agent.properties to read (default {DEFAULT_PATH})")
    parser.add_argument("--check", action="store_true",
                        help="validate the file and the host, then exit 0 (ok) or 1")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the agent; returns the exit status (1 on a configuration or host error)."""
    args = _parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"hostdev-agent: {exc}", file=sys.stderr)
        return 1
    configure_logging(config.log_level, json=config.log_format == "json")
    if args.check:
        return check(config)
    for warning in config.warnings:
        log.warning("config_warning", problem=warning)
    try:
        config = ensure_guid(config)
        host = open_hypervisor(config.libvirt_uri, _stand_ins(config))
    except (AgentError, OSError) as exc:
        log.error("agent_start_failed", error=str(exc))
        return 1
    try:
        report = check_host(config, host.pci_devices(), host.domains(), host.pci_backends())
    except HypervisorError as exc:
        log.error("agent_start_failed", error=str(exc))
        host.close()
        return 1
    _log_report(report)
    if not report.ok:
        host.close()
        return 1
    return _run(config, host, report)


def _run(config: AgentConfig, host: Hypervisor, report: CheckReport) -> int:
    """Connects the bus (a few tries if the broker is starting) and runs the agent."""
    # kombu is only needed from here on
    from hostdev.messages.bus import Bus, BusConfig
    from hostdev.messages.bus.failures import is_transient

    bus = Bus(BusConfig(url=config.amqp_url, queue_type=config.amqp_queue_type,
                        app_id="hostdev-agent"))
    agent = Agent(config, host, bus, report)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda _sig, _frame: agent.stop())
    log.info("agent_starting", host=config.guid, name=config.name, uri=config.libvirt_uri,
             amqp=bus.config.safe_url())
    try:
        retry(bus.connect, transient=is_transient, what="broker")
        serve_agent_metrics(config.metrics_port)  # off unless metrics.port is set
        agent.run()
    except BusError as exc:  # one line naming the URL and the cause; systemd restarts us
        print(f"hostdev-agent: {exc}", file=sys.stderr)
        host.close()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
