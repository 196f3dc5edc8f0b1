"""What signals, the control socket and --reload ask of the Master: reload, resize, reopen logs."""

from __future__ import annotations

import asyncio
import logging
import signal

from balancer.config import MAX_WORKERS, WORKERS_PER_CPU, ConfigError
from balancer.process import Phase
from balancer.logs import LogSetupError, reopen_log_files, setup_master_logging

log = logging.getLogger("balancer")


class MasterCommands:
    """The command half of the Master (its state lives in Master.__init__); split out to keep each file readable."""

    def handle_signal(self, sig: int) -> None:
        """SIGHUP: rolling reload; SIGTTIN/SIGTTOU: one worker more/fewer; SIGUSR1: reopen log files."""
        sup = self.supervisor
        if sig == signal.SIGHUP:
            self.request_reload()
        elif sig == signal.SIGTTIN:
            if sup.target >= MAX_WORKERS:
                log.warning("SIGTTIN ignored: %d workers is the most allowed (%d per usable CPU)", sup.target,
                            WORKERS_PER_CPU)
            else:
                sup.scale(sup.target + 1)
        elif sig == signal.SIGTTOU:
            sup.scale(max(1, sup.target - 1))
        elif sig == signal.SIGUSR1:
            self.reopen_logs()

    def reopen_logs(self) -> None:
        """SIGUSR1 (logrotate): reopen the master's log files, and have every worker reopen its own."""
        try:
            count = reopen_log_files()
        except OSError as exc:  # the old files stay in use
            log.error("SIGUSR1: reopening log files failed: %s", exc)
        else:
            log.info("SIGUSR1: log files reopened (%d); the workers reopen theirs", count)
        if self.supervisor is not None:
            self.reopen_pending.update(w.pid for w in self.supervisor.records())
            self.forward_reopen()

    def forward_reopen(self) -> None:
        """Pass SIGUSR1 on to workers owed it, once they are past booting.

        A worker ignores SIGUSR1 only from its first lines on and reopens on it only once its loop runs:
        before that, the default action would kill it. A booting worker gets it when it reports ready.
        """
        if not self.reopen_pending:
            return
        for w in self.supervisor.records():
            if w.pid in self.reopen_pending and w.phase is not Phase.BOOTING:
                self.reopen_pending.discard(w.pid)
                w.signal(signal.SIGUSR1)
        self.reopen_pending.intersection_update(self.supervisor.table)  # reaped ones are owed nothing

    def request_reload(self) -> asyncio.Future:
        """Rolling reload, told to systemd: RELOADING=1 now, READY=1 once it is over (done or given up)."""
        if self.reread is not None:
            self.reread_config()  # first: the reload's workers start with the file's new settings
        self.notifier.reloading(f"reloading {self.supervisor.target} workers")
        # A future, not a task: nothing to hold; it ends True or False. --preload: a new zygote imports first.
        return self.supervisor.request_reload() if self.zygotes is None else self.zygotes.reload()

    def reread_config(self) -> None:
        """Apply the file's reloadable changes; name those that need a restart; a bad file keeps the old config."""
        from balancer.sources import merge_reload

        try:
            config, applied, kept = merge_reload(self.config, self.reread())
        except ConfigError as exc:
            log.error("reload keeps the old configuration: %s", exc)
            return
        if kept:
            log.warning("changed in the config file but needs a restart: %s",
                        ", ".join("--" + name.replace("_", "-") for name in kept))
        if not applied:
            return
        log.info("reload applies from the config file: %s",
                 ", ".join("--" + name.replace("_", "-") for name in applied))
        old, self.config = self.config, config
        self.supervisor.config = config
        self.parking.idle_timeout = config.keepalive_timeout  # a parked connection idles as its worker would
        try:  # as gunicorn does on SIGHUP: the log options anew (the new workers get them too)
            setup_master_logging(config)
        except LogSetupError as exc:
            log.error("reload: %s", exc)
        if config.workers != old.workers:
            self.supervisor.scale(config.workers)

    def reload_over(self, done: bool) -> None:
        """READY=1 once a reload is over (a hook of the supervisor's: once, however many SIGHUPs it answers)."""
        self.notifier.ready(self.serving_status() if done else "reload stopped: the previous workers serve on")

    def serving_status(self) -> str:
        """The STATUS= line systemctl status shows."""
        return (f"{self.supervisor.target} workers serving on "
                + ", ".join(listener.described for listener in self.listeners))

    def _on_source_change(self, paths: list[str]) -> None:
        """--reload: a changed source file takes the SIGHUP path (held back while booting, ignored once stopping)."""
        if self.stopping:
            return
        log.info("--reload: %s changed", ", ".join(paths[:3])
                 + (f" and {len(paths) - 3} more" if len(paths) > 3 else ""))
        self.signals.put_nowait(signal.SIGHUP)
