"""The master process: listeners, dispatcher, supervisor, metrics and control wired into one event loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import resource
import signal
import socket
import time
from typing import Callable

from balancer import handoff, privileges, proctitle, systemd
from balancer.accepting import AcceptPath
from balancer.commands import MasterCommands
from balancer.config import Config, ConfigError, parse_octal
from balancer.dispatch import Dispatcher
from balancer.eventloop import loop_factory
from balancer.listeners import Listener, open_listeners
from balancer.parking import Parking
from balancer.process import BootError, spawn_process, worker_env
from balancer.reaper import OrphanReaper
from balancer.signals import HANDLED_SIGNALS, IGNORED_SIGNALS, STOP_SIGNALS, UPGRADE_SIGNAL, why_ignored
from balancer.supervisor import Supervisor
from balancer.upgrade import Upgrader
from balancer.upgrade_state import StateError

log = logging.getLogger("balancer")

TICK = 0.25  # seconds between supervision checks (heartbeats, deadlines, memory)
STALL_AFTER = 0.5  # seconds without an ack before a worker gets no new connections (an ack takes microseconds)


class Master(AcceptPath, MasterCommands):
    """Owns the listening sockets and the worker pool; acts on signals recorded by its handlers."""

    def __init__(self, config: Config, reread: Callable[[], Config] | None = None, startup=None) -> None:
        self.config = config
        self.reread = reread  # builds the Config again from the -c file (SIGHUP), or None without one
        self.startup = startup  # the info lines held back until the workers serve (balancer/logs.py), or None
        self.listeners: list[Listener] = []
        self.dispatcher = Dispatcher(config.worker_connections, on_blocked=self._on_blocked, hold=config.dispatch_hold)
        self.supervisor: Supervisor | None = None
        self.parking: Parking | None = None  # idle keep-alive connections the workers gave back
        self.zygotes = None  # --preload: the zygotes that fork the workers (balancer/zygote.py)
        self.signals: asyncio.Queue[int] = asyncio.Queue()
        self.paused = True  # not reading the listeners: no worker ready yet, or all at their caps
        self.stopping = False  # a stop was asked for: /readyz says 503, maybe while serving on (--shutdown-delay)
        self.draining = False  # the listeners are closed and the workers drain (stopping is True too)
        self.booted = False  # every first worker reported ready: reload and scale may act
        self.accepted = 0
        self.accept_errors: dict[str, int] = {}
        self.paused_seconds = 0.0  # time paused while some worker was ready: backpressure, not an outage
        self._paused_since = time.monotonic()
        self._pause_for_room = False  # the current pause is counted in paused_seconds
        self._accept_backoff = 0.0
        self._accept_retry: asyncio.TimerHandle | None = None
        self._tick: asyncio.TimerHandle | None = None
        self._capacity_poll: asyncio.TimerHandle | None = None
        self._coalesce_timer: asyncio.TimerHandle | None = None
        self._hold_timer: asyncio.TimerHandle | None = None  # the next held connection's deadline
        self.coalesced = 0  # times accepting waited for a bigger batch (--accept-coalesce)
        self.started = time.time()
        self.services: list = []  # metrics endpoint, control socket: objects with async close()
        self.run_as: privileges.RunAs | None = None  # --user/--group: who the master becomes once bound
        self.janitor: tuple[int, int] | None = None  # (pid, pipe end) of the process removing what we cannot
        self.reaper = OrphanReaper(self._is_worker)
        self.reopen_pending: set[int] = set()  # booting workers owed a SIGUSR1 (log reopen) once they are ready
        self.notifier = systemd.Notifier()  # takes NOTIFY_SOCKET out of the environment the workers inherit
        self.upgrader = Upgrader(self)  # SIGUSR2, `balancer upgrade`: re-exec in place (balancer/upgrade.py)

    # ---- running --------------------------------------------------------------------------------

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT; return the exit code."""
        loop = asyncio.get_running_loop()
        self.run_as = privileges.prepare(self.config)
        try:
            upgraded = self.upgrader.take() is not None  # re-executed by an upgrade: the previous image's state
        except StateError as exc:
            raise ConfigError(f"upgrade: {exc}") from None
        if upgraded:
            self.listeners = self.upgrader.adopt_listeners()
        else:
            self.listeners = open_listeners(self.config.binds, self.config.backlog, self.config.tcp_keepalive,
                                            parse_octal(self.config.socket_mode, "--socket-mode"),
                                            privileges.socket_owner(self.config, self.run_as))
            # TCP listeners we bound go to systemd's fd store (when the unit keeps one): the next start gets
            # them back as LISTEN_FDS. Not unix ones: their path is removed at exit.
            self.notifier.store_fds([listener.sock.fileno() for listener in self.listeners
                                     if listener.systemd_fd is None and not listener.unlink], "listener")
        proctitle.title_master(self.config.name, [listener.label for listener in self.listeners])
        await self._keep_signals_off_other_threads(loop)
        for sig in HANDLED_SIGNALS:
            # The handler only records the signal; the loop below acts on it.
            loop.add_signal_handler(sig, self.signals.put_nowait, sig)
        # `balancer run` blocked them while it started (launch.py): one that came meanwhile is delivered now, to
        # the handler, instead of killing (SIGHUP, SIGUSR1) or stopping (SIGTTIN) a master not yet listening.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
        self.reaper.start(loop)  # before the first worker: whatever its backend orphans comes back to us
        env = worker_env()
        # Settings read at each spawn: the workers of a reload get what the re-read config file says.
        if self.config.preload:
            from balancer.zygote import Zygotes

            self.zygotes = Zygotes(lambda: self.config.worker_settings(), env, lambda: self.config.boot_timeout)
        spawn = self.zygotes.spawn if self.zygotes is not None else (
            lambda slot, generation: spawn_process(slot, generation, self.config.worker_settings(), env))
        self.supervisor = Supervisor(self.config, self.dispatcher, self._on_capacity, spawn=spawn)
        self.parking = Parking(loop, self._dispatch_resumed, self.dispatcher.peers, self.config.keepalive_timeout)
        self.supervisor.on_return = self._on_return
        self.supervisor.on_reload_hooks.append(self.reload_over)  # READY=1 for systemd
        if self.zygotes is not None:
            self.zygotes.bind(self.supervisor)
            # A reload whose code does not import never reaches the supervisor: its READY=1 comes from here.
            self.zygotes.on_import_failed.append(lambda: self.reload_over(False))
        try:
            if upgraded:  # accepting again first: the control and metrics sockets' backlogs hold their clients
                self.upgrader.adopt_pool()  # its workers, same pids, ready; counters continued
                self._on_capacity()
            await self._start_services()
            if self.run_as is not None:
                await self._drop_privileges()
            if upgraded:
                self.upgrader.resumed()  # the metrics' folded counters, the log line, `upgrade --wait` answered
                if self.startup is not None:
                    self.startup.release()
                self.notifier.ready(self.serving_status())
            elif await self._boot():
                self.booted = True
                if self.startup is not None:
                    self.startup.release()
                log.info("balancer %d workers serving on %s (pid %d, hand-off in %s)", self.config.workers,
                         ", ".join(listener.described for listener in self.listeners), os.getpid(),
                         "C" if handoff.IMPLEMENTATION == "c" else "Python")
                self.notifier.ready(self.serving_status())
            self._schedule_tick()
            while True:
                sig = self._stop_first(await self.signals.get())
                if sig in STOP_SIGNALS:
                    self.stopping = True  # /readyz answers 503 from now on
                    self.notifier.stopping(f"{signal.Signals(sig).name}: stopping")
                    if self.booted and self.config.shutdown_delay > 0:
                        sig = await self._serve_before_drain(sig)
                    log.info("%s: graceful shutdown", signal.Signals(sig).name)
                    await self._shutdown_unless_hurried()
                    return 0
                if sig == UPGRADE_SIGNAL:
                    self.upgrader.start()
                elif sig in IGNORED_SIGNALS:
                    self._log_ignored(sig)
                else:
                    self.handle_signal(sig)
        except BootError:
            log.debug("boot failed", exc_info=True)
            await self.shutdown()
            raise
        finally:
            # The master is ending: closing the loop puts these signals back to their default actions, and a
            # SIGUSR1 from logrotate or a SIGTTIN that came now would kill it or stop it before it exits 0.
            signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
            self._close_listeners()
            self.reaper.stop()
            self.notifier.close()
            privileges.stop_janitor(self.janitor)

    @staticmethod
    def _log_ignored(sig: int) -> None:
        """One line for a signal the master survives without acting on it (gunicorn's USR2, WINCH...)."""
        line = why_ignored(sig)
        if line:
            log.warning("%s", line)

    @staticmethod
    async def _keep_signals_off_other_threads(loop) -> None:
        """Make every thread but this one block the handled signals, so they only ever come to the loop.

        A process-directed signal goes to any thread not blocking it. At the end of a stop the master blocks
        them in its main thread before the loop's close puts their default actions back; a helper thread
        (the executor that reads /proc for /metrics, libuv's pool that resolves names) must not take one then.
        Threads inherit the mask they are created with: the executor's block it as they start, and libuv's
        pool, started here at the first lookup, starts while `balancer run` still holds them back.
        """
        loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(
            max_workers=2, thread_name_prefix="balancer-proc", initializer=signal.pthread_sigmask,
            initargs=(signal.SIG_BLOCK, HANDLED_SIGNALS)))
        # A numeric lookup: no name service is asked, but uvloop still runs it on (and so starts) libuv's pool.
        await loop.getnameinfo(("127.0.0.1", 0), socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)

    async def _serve_before_drain(self, sig: int) -> int:
        """Keep accepting for --shutdown-delay while /readyz says 503; the stop signal to drain with.

        Load balancers (a Kubernetes Service's endpoints) stop routing here only some time after the stop
        starts, and asynchronously: connections routed here meanwhile are still served. A second stop signal
        ends the wait (the next one during the drain cuts it short); other signals are ignored from now on.
        """
        delay = self.config.shutdown_delay
        log.info("%s: not ready; serving %gs more before draining (--shutdown-delay)", signal.Signals(sig).name,
                 delay)
        timer = asyncio.ensure_future(asyncio.sleep(delay))
        try:
            while True:
                again = await self._signal_unless_done(timer)
                if again is None:
                    return sig
                if again in STOP_SIGNALS:
                    log.info("%s again: draining now, before the end of --shutdown-delay",
                             signal.Signals(again).name)
                    return again
                if again == signal.SIGUSR1:  # logrotate does not wait for our shutdown
                    self.reopen_logs()
                    continue
                log.info("%s ignored: shutting down", signal.Signals(again).name)
        finally:
            timer.cancel()

    def _stop_first(self, sig: int) -> int:
        """sig, unless a stop signal waits in the queue too: then that stop, the others kept in their order.

        Signals sent one after the other can reach the queue out of order: each goes to whichever thread of
        ours the kernel picks, and the handler of the one scheduled first records first. A stop must not wait
        behind a resize that came after it: the worker that resize starts would be cut off as it boots.
        """
        if sig in STOP_SIGNALS or self.signals.empty():
            return sig
        waiting = [sig]
        while not self.signals.empty():
            waiting.append(self.signals.get_nowait())
        stop = next((s for s in waiting if s in STOP_SIGNALS), None)
        if stop is not None:
            waiting.remove(stop)
        for other in waiting[1:] if stop is None else waiting:
            self.signals.put_nowait(other)
        return sig if stop is None else stop

    async def _signal_unless_done(self, work: asyncio.Future) -> int | None:
        """The next signal received, or None when work finishes first."""
        next_signal = asyncio.ensure_future(self.signals.get())
        await asyncio.wait((work, next_signal), return_when=asyncio.FIRST_COMPLETED)
        if next_signal.done():
            return next_signal.result()
        next_signal.cancel()
        return None

    async def _shutdown_unless_hurried(self) -> None:
        """Graceful shutdown; a second stop signal meanwhile (Ctrl-C twice) kills the workers at once."""
        drain = asyncio.ensure_future(self.shutdown())
        while not drain.done():
            sig = await self._signal_unless_done(drain)
            if sig in STOP_SIGNALS and self.supervisor is not None:
                log.warning("%s again: stopping now; in-flight requests are cut off", signal.Signals(sig).name)
                self.supervisor.kill_all()
            elif sig == signal.SIGUSR1:
                self.reopen_logs()
        await drain

    async def _boot(self) -> bool:
        """Start the workers; False when a stop signal came first (it is queued again for the main loop).

        Other signals (SIGHUP, SIGTTIN, SIGTTOU) wait for the boot to finish: a reload or a resize of
        workers that are not up yet would cut short the boot that reports whether the backend works.
        """
        boot = asyncio.ensure_future(self._start_pool())
        later: list[int] = []
        try:
            while True:
                sig = await self._signal_unless_done(boot)
                if sig is None:
                    boot.result()  # a BootError propagates
                    return True
                if sig in STOP_SIGNALS:
                    if boot.done() and not boot.cancelled():
                        boot.exception()  # a boot that failed just as the signal came: the stop wins, quietly
                    boot.cancel()
                    later.insert(0, sig)
                    return False
                later.append(sig)
        finally:
            for sig in later:
                self.signals.put_nowait(sig)

    async def _start_pool(self) -> None:
        """--preload: the zygote's import first (a failure is the backend's boot error); then the workers."""
        if self.zygotes is not None:
            await self.zygotes.boot()
        await self.supervisor.start()

    def _is_worker(self, pid: int) -> bool:
        """True for a worker (or zygote) process the supervisor (or the zygote keeper) still has to reap itself."""
        return self.supervisor is not None and pid in self.supervisor.table or (
            self.zygotes is not None and self.zygotes.owns(pid)) or pid in self.upgrader.children

    async def _drop_privileges(self) -> None:
        """Bound and set up as root: become --user for good; workers, all started after this, are that user too."""
        made = [(listener.unlink, listener.identity) for listener in self.listeners if listener.unlink]
        made += [item for service in self.services for item in getattr(service, "files", ())]
        stuck = set(privileges.unremovable(self.run_as, [path for path, _ in made]))
        if stuck:  # the user may not remove these (a pid file in /run): a janitor that stays root will
            self.janitor = privileges.start_janitor([(path, identity) for path, identity in made if path in stuck])
            log.info("%s: in a directory user %s may not write; removed at exit by a janitor process (pid %d) "
                     "that keeps root for that alone", ", ".join(sorted(stuck)), self.run_as.name, self.janitor[0])
        # The log files were given to the user as they were created (balancer/cli.py), and only those: become()
        # checks the user can write each one, as its workers, and the master after SIGUSR1, open them again.
        try:
            privileges.become(self.run_as, self.config)
        except ConfigError:
            await self._close_services()
            raise

    async def _start_services(self) -> None:
        """Start the metrics endpoint and the control socket; if one fails, close what started and raise."""
        from balancer.control import ControlServer

        try:
            if self.config.metrics_bind != "none":
                from balancer.metrics import MetricsServer

                metrics = MetricsServer(self)
                metrics.registry.register(self.reaper)  # balancer_orphans_reaped_total
                if self.zygotes is not None:
                    metrics.registry.register(self.zygotes)  # balancer_zygote_*
                self.services.append(metrics)  # before start(): a half-started server is closed too
                try:
                    await metrics.start()  # logs "metrics on http://HOST:PORT/metrics"
                except OSError as exc:
                    reason = os.strerror(exc.errno) if exc.errno else str(exc)
                    raise ConfigError(f"cannot bind metrics {self.config.metrics_bind}: {reason}") from None
            control = ControlServer(self)
            self.services.append(control)
            await control.start()
            if self.config.reload:
                from balancer.devreload import DevReloader

                watcher = DevReloader(self.config.app_dir or os.getcwd(), self._on_source_change)
                self.services.append(watcher)
                await watcher.start()
        except BaseException:
            await self._close_services()
            raise

    async def _close_services(self) -> None:
        """Close the metrics endpoint and the control socket (it removes only the files it created)."""
        services, self.services = self.services, []
        for service in services:
            await service.close()

    def _schedule_tick(self) -> None:
        """Run supervision checks every TICK seconds."""
        self._every_tick(self.supervisor.tick,
                         self.dispatcher.collect_all,  # when idle, the master's copies of acked fds close here
                         lambda: self.dispatcher.mark_overdue(time.monotonic(), STALL_AFTER),
                         self._on_capacity,  # a ready worker may have been missed while all were blocked
                         self.reaper.reap,  # SIGCHLDs coalesce; what one pass missed, the tick gets
                         self.forward_reopen,  # SIGUSR1 for workers that were booting when it came
                         self.notifier.watchdog,  # WATCHDOG=1 from the loop itself: a hung loop stops it
                         self.parking.expire,  # parked connections idle past --keepalive-timeout
                         *([self.zygotes.tick] if self.zygotes is not None else []))

    def _every_tick(self, *steps: Callable[[], object]) -> None:
        """Run steps every TICK seconds, each on its own: one failing step must not stop the others or the tick.

        The timer is re-armed before any step runs, so an exception cannot end heartbeat checks, ack-overdue
        marks or kill deadlines for good.
        """
        loop = asyncio.get_running_loop()
        if self._tick is not None:
            self._tick.cancel()

        def tick() -> None:
            self._tick = loop.call_later(TICK, tick)
            for step in steps:
                try:
                    step()
                except Exception:
                    log.exception("periodic check %s failed; it runs again next tick",
                                  getattr(step, "__qualname__", step))

        self._tick = loop.call_later(TICK, tick)

    async def shutdown(self) -> None:
        """Stop accepting, drain every worker, close what is left."""
        if self.draining:
            return
        if self.parking is not None:  # to the workers before DRAIN reaches them: they answer what comes next
            self.parking.release_all()  # (before the pause, which places whatever the hold keeps)
        self._pause()
        self.stopping = self.draining = True
        if self._tick is not None:
            self._tick.cancel()
        if self._accept_retry is not None:
            self._accept_retry.cancel()
        if self._capacity_poll is not None:
            self._capacity_poll.cancel()
            self._capacity_poll = None
        if self._coalesce_timer is not None:
            self._coalesce_timer.cancel()
            self._coalesce_timer = None
        self._close_listeners()
        if self.supervisor is not None:
            self._schedule_shutdown_tick()
            await self.supervisor.shutdown()
        if self.zygotes is not None:
            await self.zygotes.close()
        if self.parking is not None:
            self.parking.close_all()
        self.dispatcher.close_homeless()
        for service in self.services:
            await service.close()

    def _schedule_shutdown_tick(self) -> None:
        """Keep enforcing kill deadlines while draining."""
        self._every_tick(self.supervisor.tick, self.dispatcher.collect_all, self.reaper.reap, self.notifier.watchdog)

    def _close_listeners(self) -> None:
        """Close every listening socket (and remove unix paths we created)."""
        for listener in self.listeners:
            listener.close()
        self.listeners = []


def raise_fd_limit(worker_connections: int) -> int:
    """Lift the soft RLIMIT_NOFILE to the hard one (workers inherit it); warn if the cap cannot fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        try:
            # 1024 is a common soft default, below what --worker-connections 1000 plus a backend's own
            # files and sockets needs; the hard limit is what the administrator allows.
            target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and worker_connections + 64 > soft:
        log.warning("--worker-connections %d is more than a worker can open (RLIMIT_NOFILE %d); "
                    "connections past the limit are refused and re-dispatched", worker_connections, soft)
    return soft


def run_master(config: Config, loop_choice: str = "auto", reread: Callable[[], Config] | None = None,
               startup=None) -> int:
    """Run a master to completion; returns its exit code. startup: a logs.StartupHold to release once serving."""
    raise_fd_limit(config.worker_connections)
    master = Master(config, reread, startup)
    with asyncio.Runner(loop_factory=loop_factory(loop_choice)) as runner:
        return runner.run(master.run())


__all__ = ["Master", "run_master", "BootError", "ConfigError"]
