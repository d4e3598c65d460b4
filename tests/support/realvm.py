"""The real tier's lab: two libvirtd daemons (QEMU/TCG) and a guest that boots in seconds.

``real_lab(workdir)`` sets up what it needs on a fresh Debian 12 machine and
tears down what it started:

- Debian packages (``PACKAGES``), installed with apt only when missing;
- a guest: a Debian cloud kernel taken with ``apt-get download`` and
  unpacked (nothing installed into /boot), and a busybox initramfs whose
  ``/init`` prints a counter and the guest's PCI devices on the serial
  console every 0.2 s; both cached under ``cache_dir()`` between runs;
- two ``libvirtd`` daemons as two hosts: each in its own mount namespace
  (private ``/run/libvirt``, ``/var/lib/libvirt``, ``/etc/libvirt``... bound
  from the work folder), listening on a free TCP port on loopback with no
  authentication, each with its own ``host_uuid`` (libvirt refuses to migrate
  between hosts with the same one). Nothing of the machine's own libvirt
  configuration is read or changed.

Every missing piece raises ``LabError`` saying what and how to fix it: the
tier fails, it never skips.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import uuid as uuid_module
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import libvirt

from tests.support.waiting import wait_for

#: What the lab runs on (``apt-get install --no-install-recommends``).
PACKAGES = ("libvirt-daemon", "libvirt-daemon-driver-qemu", "libvirt-clients",
            "qemu-system-x86", "busybox-static", "cpio")
#: The metapackage naming the current Debian cloud kernel.
KERNEL_META = "linux-image-cloud-amd64"
#: The guest's memory: the smallest the cloud kernel boots in comfortably.
GUEST_MEMORY_MIB = 96
#: The line the guest's /init prints: ``hostdev-lab tick=N pci=0000:00:00.0,...``.
TICK = re.compile(r"hostdev-lab tick=(\d+) pci=([0-9a-f:.,]*)")

_INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
n=0
while true; do
  n=$((n+1))
  echo "hostdev-lab tick=$n pci=$(ls /sys/bus/pci/devices | tr '\\n' ',')"
  sleep 0.2
done
"""

_QEMU_CONF = """user = "root"
group = "root"
security_driver = "none"
dynamic_ownership = 0
stdio_handler = "file"
"""

_PRIVATE_DIRS = ("/run/libvirt", "/var/lib/libvirt", "/var/cache/libvirt", "/var/log/libvirt",
                 "/etc/libvirt")


class LabError(RuntimeError):
    """Something the real tier needs is missing; the message says how to get it."""


def cache_dir() -> Path:
    """Returns where the guest's kernel and initramfs are kept between runs.

    ``HOSTDEV_REALVM_CACHE``, else ``$XDG_CACHE_HOME/hostdev/realvm``
    (``~/.cache/hostdev/realvm``).
    """
    explicit = os.environ.get("HOSTDEV_REALVM_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hostdev" / "realvm"


def _run(*argv: str, cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False,
                              timeout=600)
    except FileNotFoundError:
        raise LabError(f"{argv[0]} is not installed; the real tier needs it") from None
    if done.returncode != 0:
        raise LabError(f"`{' '.join(argv)}` failed ({done.returncode}): "
                       f"{(done.stderr or done.stdout).strip()[-600:]}")
    return done.stdout


def ensure_packages() -> None:
    """Installs the Debian packages the lab needs, only those missing."""
    missing = [p for p in PACKAGES if "install ok installed" not in subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", p], capture_output=True, text=True,
        check=False).stdout]
    if not missing:
        return
    if os.geteuid() != 0:
        raise LabError(f"the real tier needs the Debian packages {' '.join(missing)}: "
                       f"sudo apt-get install --no-install-recommends {' '.join(missing)}")
    _run("apt-get", "update", "-qq")
    env_run = ["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y", "-qq",
               "--no-install-recommends", *missing]
    _run(*env_run)


@dataclass(frozen=True)
class GuestFiles:
    """The guest's boot files."""

    kernel: Path
    initrd: Path


def guest_files(cache: Path | None = None) -> GuestFiles:
    """Returns the kernel and initramfs, downloading and building them when not cached."""
    cache = cache or cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    kernels = sorted(cache.glob("kernel/boot/vmlinuz-*"))
    if not kernels:
        depends = _run("apt-cache", "depends", KERNEL_META)
        found = re.search(r"Depends: (linux-image-\S+)", depends)
        if found is None:
            raise LabError(f"apt knows no {KERNEL_META}; add Debian's main archive to "
                           "/etc/apt/sources.list and run apt-get update")
        download = cache / "download"
        shutil.rmtree(download, ignore_errors=True)
        download.mkdir()
        _run("apt-get", "download", found.group(1), cwd=download)
        debs = list(download.glob("*.deb"))
        shutil.rmtree(cache / "kernel", ignore_errors=True)
        _run("dpkg-deb", "-x", str(debs[0]), str(cache / "kernel"))
        shutil.rmtree(download)
        kernels = sorted(cache.glob("kernel/boot/vmlinuz-*"))
        if not kernels:
            raise LabError(f"{debs[0].name} holds no /boot/vmlinuz-*")
    initrd = cache / "initramfs.cpio.gz"
    if not initrd.exists() or initrd.stat().st_mtime < Path(__file__).stat().st_mtime:
        _build_initramfs(cache, initrd)
    return GuestFiles(kernel=kernels[-1], initrd=initrd)


def _build_initramfs(cache: Path, target: Path) -> None:
    busybox = Path("/bin/busybox")
    if not busybox.exists():
        raise LabError("busybox-static is not installed: apt-get install busybox-static")
    root = cache / "initramfs"
    shutil.rmtree(root, ignore_errors=True)
    for folder in ("bin", "proc", "sys", "dev"):
        (root / folder).mkdir(parents=True)
    shutil.copy(busybox, root / "bin" / "busybox")
    init = root / "init"
    init.write_text(_INIT, encoding="utf-8")
    init.chmod(0o755)
    partial = target.with_suffix(".tmp")
    with partial.open("wb") as out:
        listing = subprocess.run(["find", "."], cwd=root, capture_output=True, check=True)
        cpio = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=root,
                              input=listing.stdout, capture_output=True, check=True)
        out.write(_gzip(cpio.stdout))
    partial.replace(target)
    shutil.rmtree(root)


def _gzip(data: bytes) -> bytes:
    import gzip

    return gzip.compress(data, compresslevel=6)


def free_port() -> int:
    """Returns a TCP port free on loopback now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class LabHost:
    """One libvirtd daemon: a host of the lab."""

    name: str
    root: Path
    port: int
    host_uuid: str = field(default_factory=lambda: str(uuid_module.uuid4()))
    process: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        """The host's libvirt URI, as agents and peers reach it."""
        return f"qemu+tcp://127.0.0.1:{self.port}/system"

    @property
    def log(self) -> Path:
        """libvirtd's own log."""
        return self.root / "libvirtd.log"

    def start(self) -> None:
        """Writes the daemon's configuration and starts it in its own mount namespace."""
        for private in _PRIVATE_DIRS:
            Path(private).mkdir(parents=True, exist_ok=True)  # the mount points
            (self.root / private.strip("/")).mkdir(parents=True, exist_ok=True)
        etc = self.root / "etc/libvirt"
        (etc / "qemu.conf").write_text(_QEMU_CONF, encoding="utf-8")
        conf = etc / "libvirtd.conf"
        conf.write_text(
            f'listen_tls = 0\nlisten_tcp = 1\nauth_tcp = "none"\ntcp_port = "{self.port}"\n'
            f'listen_addr = "127.0.0.1"\nhost_uuid = "{self.host_uuid}"\n'
            f'log_outputs = "3:file:{self.log}"\n', encoding="utf-8")
        binds = " && ".join(f"mount --bind {self.root / d.strip('/')} {d}"
                            for d in _PRIVATE_DIRS)
        script = (f"{binds} && exec libvirtd --listen --pid-file {self.root / 'libvirtd.pid'} "
                  "-f /etc/libvirt/libvirtd.conf")
        self.process = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
            stdout=(self.root / "stdout.log").open("wb"), stderr=subprocess.STDOUT,
            start_new_session=True)
        wait_for(self._answers, timeout=30, what=f"libvirtd {self.name} listening on "
                 f"127.0.0.1:{self.port} (see {self.log})")

    def _answers(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise LabError(f"libvirtd {self.name} exited ({self.process.returncode}); "
                           f"see {self.root / 'stdout.log'} and {self.log}")
        try:
            conn = libvirt.open(self.uri)
        except libvirt.libvirtError:
            return False
        try:
            return bool(conn.getVersion())  # the QEMU driver answers, not just the socket
        finally:
            conn.close()

    def qemu_pids(self) -> list[int]:
        """Returns the QEMU processes this daemon started (from its pid files)."""
        pids = []
        for pid_file in (self.root / "run/libvirt/qemu").glob("*.pid"):
            try:
                pids.append(int(pid_file.read_text().strip()))
            except (OSError, ValueError):
                continue
        return pids

    def stop(self) -> None:
        """Stops the daemon and any QEMU it left running."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for pid in self.qemu_pids():
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@dataclass(frozen=True)
class Lab:
    """Two hosts and the guest's boot files."""

    a: LabHost
    b: LabHost
    guest: GuestFiles
    workdir: Path


def _check_host() -> None:
    if os.geteuid() != 0:
        raise LabError("the real tier starts libvirtd daemons in mount namespaces and "
                       "needs root (run it on a disposable host, a CI VM or a container "
                       "with CAP_SYS_ADMIN)")
    # The QEMU driver resolves its default user at start, whatever qemu.conf says;
    # Debian's libvirt-daemon-system (not needed here) would have created it.
    if subprocess.run(["getent", "passwd", "libvirt-qemu"], capture_output=True,
                      check=False).returncode != 0:
        _run("useradd", "--system", "--user-group", "--no-create-home", "--shell",
             "/usr/sbin/nologin", "libvirt-qemu")
    for tool in ("unshare", "libvirtd", "qemu-system-x86_64"):
        if shutil.which(tool) is None:
            raise LabError(f"{tool} is not on PATH after installing {' '.join(PACKAGES)}")


@contextmanager
def real_lab(workdir: Path) -> Iterator[Lab]:
    """Sets up the packages, the guest and two daemons; stops the daemons on exit."""
    ensure_packages()
    _check_host()
    guest = guest_files()
    with ExitStack() as stack:
        hosts = []
        for name in ("a", "b"):
            host = LabHost(name=name, root=workdir / f"host-{name}", port=free_port())
            stack.callback(host.stop)
            host.start()
            hosts.append(host)
        yield Lab(a=hosts[0], b=hosts[1], guest=guest, workdir=workdir)



def lab_template(guest: GuestFiles, console_dir: Path, *, refuse_unplug: bool = False) -> str:
    """Returns a domain template booting the lab guest, its console in ``console_dir``.

    The shape of ``etc/templates/kernel-boot.xml`` without its network (the
    lab's daemons have none). ``refuse_unplug`` boots the guest with
    ``acpiphp.disable=1``: it never releases a device, like a guest without
    ``acpiphp``. The type is ``qemu`` (TCG) even where ``/dev/kvm`` exists:
    a machine whose CPUs lack vmx/svm may still have the device node, and a
    guest under KVM there never boots.
    """
    cmdline = "console=ttyS0 quiet" + (" acpiphp.disable=1" if refuse_unplug else "")
    return f"""<domain type='qemu'>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{guest.kernel}</kernel>
    <initrd>{guest.initrd}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <features>
    <acpi/>
  </features>
  <devices>
    <serial type='file'>
      <source path='{console_dir}/vm.log' append='on'/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>
  </devices>
</domain>"""


@dataclass(frozen=True)
class Tick:
    """One line the guest printed: its counter and the PCI devices it sees."""

    n: int
    pci: frozenset[str]


class Console:
    """A guest's serial console file, as its /init writes it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def ticks(self) -> list[Tick]:
        """Returns every tick printed so far, in order."""
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return []
        return [Tick(int(m.group(1)), frozenset(filter(None, m.group(2).split(","))))
                for m in TICK.finditer(text)]

    def last(self) -> Tick | None:
        """Returns the latest tick, None before the guest's /init ran."""
        ticks = self.ticks()
        return ticks[-1] if ticks else None

    def wait_tick_after(self, n: int, timeout: float = 60.0) -> Tick:
        """Waits for a tick numbered above ``n`` and returns it."""
        return wait_for(lambda: next((t for t in reversed(self.ticks()) if t.n > n), None),
                        timeout=timeout, what=f"the guest's tick after {n} in {self.path}")

    def wait_sees(self, slot: int, present: bool = True, timeout: float = 30.0) -> Tick:
        """Waits until a fresh tick shows (or no longer shows) ``0000:00:<slot>.0``."""
        device = guest_pci(slot)
        since = (self.last() or Tick(0, frozenset())).n
        return wait_for(lambda: next((t for t in self.ticks()[::-1] if t.n > since
                                      and (device in t.pci) == present), None),
                        timeout=timeout, what=f"the guest {'seeing' if present else 'losing'} "
                        f"{device} in {self.path}")


def guest_pci(slot: int) -> str:
    """Returns how the guest names the device at ``slot`` of bus 0."""
    return f"0000:00:{slot:02x}.0"
