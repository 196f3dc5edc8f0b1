"""sd_notify for a master run as a systemd service: READY, STATUS, RELOADING, STOPPING and the watchdog."""

from __future__ import annotations

import array
import logging
import os
import socket
import time

log = logging.getLogger("balancer")

# What systemd hands the main process. They are taken out of the environment: workers and the backend they
# run must not speak for the service (with NotifyAccess=all they could report READY=1 for it).
NOTIFY_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def notify_address(value: str) -> str | bytes:
    """NOTIFY_SOCKET as a socket address: a path, or an abstract name written with a leading '@'."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    return value


def watchdog_interval(environ: dict, pid: int) -> float:
    """Seconds between WATCHDOG=1 pings: half of WATCHDOG_USEC, when it is meant for pid; 0: no watchdog."""
    try:
        usec = int(environ.get("WATCHDOG_USEC", "0"))
    except ValueError:
        return 0.0
    owner = environ.get("WATCHDOG_PID", "")
    if usec <= 0 or (owner and owner != str(pid)):
        return 0.0
    return usec / 2e6


class Notifier:
    """Tells the service manager how the master is doing; does nothing when not run under systemd."""

    def __init__(self, environ: dict | None = None) -> None:
        environ = os.environ if environ is None else environ
        address = environ.get("NOTIFY_SOCKET", "")
        self.address = notify_address(address) if address else ""
        self.watchdog_every = watchdog_interval(environ, os.getpid()) if address else 0.0
        self._last_ping = 0.0
        self._failed = False  # warned once already: a vanished socket must not flood the log every tick
        self.sock: socket.socket | None = None
        for key in NOTIFY_ENV:
            environ.pop(key, None)
        if self.address:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            log.debug("systemd notify socket %s, watchdog every %gs", address, self.watchdog_every)

    def send(self, *fields: str, fds: list[int] = ()) -> bool:
        """One datagram of KEY=VALUE lines (and fds); a failure is logged, never raised: serving matters more."""
        if self.sock is None:
            return False
        try:
            if fds:
                self.sock.sendmsg(["\n".join(fields).encode()],
                                  [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))], 0, self.address)
            else:
                self.sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:
            log.log(logging.DEBUG if self._failed else logging.WARNING, "systemd notify %s failed: %s",
                    fields[0], exc)
            self._failed = True
            return False
        return True

    def store_fds(self, fds: list[int], name: str) -> bool:
        """FDSTORE=1: systemd keeps copies of fds and hands them back (LISTEN_FDS) to the service's next start.

        Only with FileDescriptorStoreMax= in the unit (systemd ignores them otherwise): a listener kept there
        outlives a crash and an automatic restart, so connections queue in its backlog instead of being refused.
        """
        return bool(fds) and self.send("FDSTORE=1", f"FDNAME={name}", fds=fds)

    def ready(self, status: str) -> None:
        """Started, or a reload finished: systemd considers the service up from now on."""
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> None:
        """Free text `systemctl status` shows."""
        self.send(f"STATUS={status}")

    def reloading(self, status: str) -> None:
        """A rolling reload started; READY=1 says when it is over (Type=notify-reload waits for it)."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", f"STATUS={status}")

    def stopping(self, status: str) -> None:
        """A stop began: systemd shows the unit as deactivating while the workers drain."""
        self.send("STOPPING=1", f"STATUS={status}")

    def watchdog(self) -> None:
        """From the master's tick: WATCHDOG=1 every WATCHDOG_USEC/2, so a hung event loop gets the service restarted."""
        if not self.watchdog_every:
            return
        now = time.monotonic()
        if now - self._last_ping >= self.watchdog_every:
            self._last_ping = now
            self.send("WATCHDOG=1")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
