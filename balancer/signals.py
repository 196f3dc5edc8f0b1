"""The signals the master acts on: held back by `balancer run` while it starts, handled by the master's loop."""

from __future__ import annotations

import os
import signal

# SIGQUIT is nginx's graceful stop (gunicorn's quick one); SIGPWR is how LXC (lxc-stop) and UPS daemons ask
# the init of a container or host to shut down cleanly: a master that is PID 1 would otherwise ignore it.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGPWR)
# SIGUSR2: the master re-executes itself in place (balancer/upgrade.py), keeping its pid, listeners and workers.
UPGRADE_SIGNAL = signal.SIGUSR2
# Signals that mean something to gunicorn or nginx, or that nobody should send a master: their default action
# would end it without a word (ALRM, VTALRM, PROF) or dump its core (XCPU). Each is one line, then ignored. SIGPIPE and SIGXFSZ Python itself ignores: a write then fails with EPIPE or EFBIG instead.
IGNORED_SIGNALS = {
    signal.SIGWINCH: "gunicorn and nginx stop their workers on it, to upgrade a daemonized master; balancer "
                     "serves on: SIGTTOU or `balancer scale N` for fewer workers, SIGTERM to stop",
    signal.SIGALRM: "a timer signal nobody should send the master",
    signal.SIGVTALRM: "a timer signal nobody should send the master",
    signal.SIGPROF: "a profiling timer signal nobody should send the master",
    signal.SIGXCPU: "over its CPU time soft limit (RLIMIT_CPU, LimitCPU=): the kernel kills it at the hard one",
}
HANDLED_SIGNALS = (*STOP_SIGNALS, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR1, UPGRADE_SIGNAL,
                   *IGNORED_SIGNALS)


def why_ignored(sig: int) -> str:
    """The line a master logs for a signal of IGNORED_SIGNALS; '' for a terminal's SIGWINCH (not worth a line)."""
    if sig == signal.SIGWINCH and has_terminal():
        return ""  # a master run in a terminal gets one at every resize of its window
    return f"{signal.Signals(sig).name} ignored: {IGNORED_SIGNALS[sig]}"


def has_terminal() -> bool:
    """True if this process has a controlling terminal (run in one, not as a service)."""
    try:
        os.close(os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY))
    except OSError:
        return False
    return True
