"""--preload, the master's side: a zygote per code generation forks the workers; spawning stands in when it cannot.

The master never imports the backend: a zygote (balancer_workers/zygote.py) does, once per generation, and
forks each worker on request. A forked worker is adopted by the master (a child subreaper) before its pid is
reported, so the supervisor waits for it, signals it and reads its /proc exactly as for one it spawned.
A reload starts a new zygote on the code on disk: if that import fails the reload fails before any worker is
touched. A zygote that dies is restarted with back-off; one that hangs on a fork is killed. Meanwhile, and for
a zygote that refuses to fork (threads or sockets opened at import), workers are spawned as without --preload.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import time
from collections import deque
from statistics import median
from typing import Callable

from balancer import wire
from balancer.backoff import Backoff
from balancer.dispatch import Link
from balancer.process import BootError, PendingFork, WorkerProcess, describe_exit, new_ends, spawn_process
from balancer.zygote_process import FORK_TIMEOUT, STOP_GRACE, Zygote, is_subreaper, start_zygote

log = logging.getLogger("balancer")

# Spares a new zygote forks before its READY (besides the few it always keeps): one per worker its generation
# starts at once (boot, reload), so none of them waits for a fork. Bounded: past it, forks are made on request.
BURST_MAX = 16


class Zygotes:
    """The zygotes of one master: the current one forks workers, the next one imports a reload's code.

    Nothing here waits: a fork request is sent and its worker recorded as booting at once; the zygote's answer
    (the pid) comes back on its channel, and a deadline timer stands for the answer that never comes.
    """

    def __init__(self, settings: Callable[[], dict], env: dict, boot_timeout: Callable[[], float],
                 start: Callable[[int, dict, dict], Zygote] = start_zygote,
                 spawn: Callable[[int, int], WorkerProcess] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings  # the workers' settings as of now (a reload may have re-read the config file)
        self.env = env
        self.boot_timeout = boot_timeout
        self._start = start
        self._spawn = spawn or (lambda slot, generation: spawn_process(slot, generation, self.settings(), env))
        self.clock = clock  # the supervisor's: a record's start time is on it
        self.loop = asyncio.get_running_loop()
        self.supervisor = None
        self.current: Zygote | None = None  # forks the workers of the newest generation once ready
        self.next: Zygote | None = None  # importing a reload's code
        self.retired: list[Zygote] = []  # older generations: exit once none of their workers is left
        self.alive: list[Zygote] = []  # every zygote started and not yet reaped, whatever its role
        self.backoff = Backoff()
        self.restarts = 0
        self.forked = 0
        self.spawned = 0  # workers started without a zygote
        self.boot_times: dict[str, deque] = {"fork": deque(maxlen=64), "spawn": deque(maxlen=64)}
        self.reload_error = ""  # the last reload's import error, until a reload imports
        self.closing = False
        self.started_up = False  # generation 0's zygote has imported: from now on a dead one is restarted
        self.enabled = True
        self._waiters: list[asyncio.Future] = []  # reloads waiting for the next zygote's import
        self.on_import_failed: list[Callable[[], None]] = []  # called when a reload fails before any worker moves
        self._respawn: asyncio.TimerHandle | None = None
        self._tokens = itertools.count(1)
        self._spawn_next: set[int] = set()  # slots whose last fork failed: their next worker is spawned

    def bind(self, supervisor) -> None:
        """Serve this supervisor: its spawns, its generation, its reloads; retire zygotes as its workers exit."""
        self.supervisor = supervisor
        supervisor.on_exit_hooks.append(lambda w: self.retire_idle())

    # ---- the zygotes' lives -------------------------------------------------------------------

    async def boot(self) -> None:
        """Start generation 0's zygote and wait for its import; BootError with the backend's reason if it fails."""
        if not is_subreaper():
            self.enabled = False
            log.warning("--preload: the master is not a child subreaper, so it cannot adopt forked workers; "
                        "workers are spawned as without --preload")
            return
        try:
            z = self.current = self._launch(0, self._burst())
        except OSError as exc:
            raise BootError(f"cannot start the zygote: {exc}") from None
        await asyncio.shield(z.ready)  # the import deadline kills it, and ready then says why
        self.started_up = True

    def _burst(self) -> int:
        """Spares a new zygote forks before it says READY: one per worker its generation starts, up to a bound."""
        return min(self.supervisor.target, BURST_MAX)

    def _launch(self, generation: int, spares: int = 0) -> Zygote:
        """Start a zygote, watch its channel and its exit, and bound its import by --boot-timeout."""
        z = self._start(generation, dict(self.settings(), spares=spares), self.env)
        self.alive.append(z)
        self.loop.add_reader(z.channel.fileno(), self._on_channel, z)
        self.loop.add_reader(z.pidfd, self._on_exit, z)
        z.deadline = self.loop.call_later(self.boot_timeout(), self._import_overdue, z)
        log.debug("zygote pid=%d started (generation %d)", z.pid, generation)
        return z

    def _import_overdue(self, z: Zygote) -> None:
        z.deadline = None
        if z.state == "importing":
            log.error("zygote pid=%d did not finish its import within --boot-timeout; killing it", z.pid)
            z.error = f"the zygote's import did not finish within --boot-timeout {self.boot_timeout():g}s"
            z.signal(signal.SIGKILL)

    def _on_channel(self, z: Zygote) -> None:
        """READY or BOOT_ERROR from an importing zygote, answers to forks; EOF once it is gone (see _on_exit)."""
        while z.channel.fileno() >= 0:
            try:
                got = wire.receive(z.channel)
            except OSError:
                got = wire.END
            if got is None:
                return
            msg, fds, _ = got
            wire.close_all(fds)
            if not msg:
                z.close_channel()
                return
            try:
                body = wire.decode_json(msg)
            except wire.ProtocolError:
                continue
            if not isinstance(body, dict) and msg[0] != wire.BOOT_ERROR:
                continue
            if msg[0] in (wire.FORKED, wire.FORK_REFUSED):
                self._answered(z, msg[0], body)
            elif msg[0] == wire.READY and z.state == "importing":
                z.state = "ready"
                z.import_seconds = float(body.get("import_seconds", 0.0))
                if z.deadline is not None:
                    z.deadline.cancel()
                    z.deadline = None
                log.info("zygote pid=%d imported the backend in %.2fs", z.pid, z.import_seconds)
                if not z.ready.done():
                    z.ready.set_result(True)
            elif msg[0] == wire.BOOT_ERROR:
                z.error = str(body)

    def _on_exit(self, z: Zygote) -> None:
        """Reap a zygote; its unanswered forks are spawned; restart the current one with back-off; a reload's
        zygote failing fails the reload."""
        if z.proc.poll() is None:
            return
        self.loop.remove_reader(z.pidfd)
        os.close(z.pidfd)
        self._on_channel(z)  # its BOOT_ERROR, or answers it sent before it went
        z.close_channel()
        was = z.state
        z.exited()
        code = z.proc.returncode
        self._unfork_all(z)
        if not z.ready.done():
            z.ready.set_exception(BootError(z.error or f"the zygote exited with {describe_exit(code)} "
                                                       "before its import finished"))
            z.ready.exception()  # retrieved: nobody may be waiting
        self.alive.remove(z)
        if z in self.retired:
            self.retired.remove(z)
        if z is not self.current or self.closing or not self.started_up or was in ("stopping", "refusing"):
            log.debug("zygote pid=%d exited (%s)", z.pid, describe_exit(code))
            return
        self.restarts += 1
        delay = self.backoff.failure(self.loop.time() - z.started)
        log.warning("zygote pid=%d (generation %d) died (%s); workers are spawned without it until it is back, "
                    "in %.2fs", z.pid, z.generation, z.error or describe_exit(code), delay)
        self._respawn = self.loop.call_later(delay, self._restart, z)

    def _restart(self, dead: Zygote) -> None:
        """Start the current generation's zygote again (on the code on disk, as a spawned worker would)."""
        self._respawn = None
        if self.closing or self.current is not dead:
            return
        try:
            self.current = self._launch(dead.generation)
        except OSError as exc:
            delay = self.backoff.failure(0.0)
            log.error("cannot restart the zygote (%s); retrying in %.2fs", exc, delay)
            self._respawn = self.loop.call_later(delay, self._restart, dead)

    def reload(self) -> asyncio.Future:
        """A reload: a new zygote imports the code on disk; once it has, the pool rolls over to it (True when done).

        Asked while a reload's zygote still imports, that zygote is dropped for a new one: every worker must end
        up on code read after the last ask. If the import fails, no worker is touched and the future says False.
        """
        done = self.loop.create_future()
        if not self.enabled:
            self._chain(self.supervisor.request_reload(), [done])
            return done
        self._waiters.append(done)
        dropped, self.next = self.next, None
        if dropped is not None:
            dropped.stop()
        try:
            z = self.next = self._launch(self.supervisor.generation + 1, self._burst())
        except OSError as exc:
            log.error("reload failed: cannot start a zygote (%s); no worker was touched", exc)
            self._import_failed()
            return done
        log.info("reload: a new zygote pid=%d imports the code on disk", z.pid)
        z.ready.add_done_callback(lambda ready: self._imported(z, ready))
        return done

    def _imported(self, z: Zygote, ready: asyncio.Future) -> None:
        """A reload's zygote finished its import (or failed it): roll the pool over to it, or fail the reload."""
        if z is not self.next:
            return  # dropped for a newer reload
        self.next = None
        if ready.exception() is not None:
            self.reload_error = str(ready.exception())
            log.error("reload failed: the new code does not import (%s); no worker was touched", self.reload_error)
            z.stop()
            self._import_failed()
            return
        self.reload_error = ""
        old, self.current = self.current, z
        if self._respawn is not None:
            self._respawn.cancel()
            self._respawn = None
        if old is not None:
            if old.state == "ready":
                self.retired.append(old)  # its workers share its pages until they are replaced
            else:
                old.stop()
        self.backoff = Backoff()
        z.generation = self.supervisor.generation + 1  # what request_reload makes the wanted generation
        waiters, self._waiters = self._waiters, []
        self._chain(self.supervisor.request_reload(), waiters)
        self.retire_idle()  # its generation may have no worker left already

    @staticmethod
    def _chain(source: asyncio.Future, targets: list[asyncio.Future]) -> None:
        """Resolve targets as source resolves."""
        def settle(src: asyncio.Future) -> None:
            ok = not src.cancelled() and src.result()
            for target in targets:
                if not target.done():
                    target.set_result(ok)
        source.add_done_callback(settle)

    def _import_failed(self) -> None:
        """A reload ends before any worker was touched: its waiters get False, the hooks hear of it."""
        self._settle_waiters(False)
        for hook in self.on_import_failed:
            hook()

    def _settle_waiters(self, ok: bool) -> None:
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(ok)

    def retire_idle(self) -> None:
        """Let the retired zygotes whose generation has no worker left exit."""
        if self.supervisor is None:
            return
        live = {w.generation for w in self.supervisor.table.values()}
        for z in list(self.retired):
            if z.generation not in live and z.state == "ready":
                log.debug("zygote pid=%d of generation %d retired: its workers are gone", z.pid, z.generation)
                z.stop()

    def tick(self) -> None:
        """Retire idle zygotes (their deadlines are timers of their own)."""
        self.retire_idle()

    def zygotes(self) -> list[Zygote]:
        """Every zygote process not yet reaped (also one dropped or failed, told to exit)."""
        return list(self.alive)

    def owns(self, pid: int) -> bool:
        """True for a process the orphan reaper must leave alone: a zygote, or any child while a fork is unanswered
        (the forked worker's pid is not known yet, and its exit status is the supervisor's)."""
        return any(z.pid == pid or z.pending for z in self.zygotes())

    async def close(self) -> None:
        """Stop every zygote and wait (bounded) until each is reaped."""
        self.closing = True
        if self._respawn is not None:
            self._respawn.cancel()
            self._respawn = None
        for z in self.zygotes():
            z.stop()
        deadline = self.loop.time() + STOP_GRACE + 1
        while self.zygotes() and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
        for z in self.zygotes():
            z.signal(signal.SIGKILL)
            self.loop.remove_reader(z.pidfd)
            z.proc.wait()
            os.close(z.pidfd)
            z.exited()
            self.alive.remove(z)
            self._unfork_all(z)
        self._settle_waiters(False)

    # ---- forking ------------------------------------------------------------------------------

    def spawn(self, slot: int, generation: int) -> WorkerProcess:
        """The supervisor's spawn: a fork asked of the zygote of generation when it can, else a fresh interpreter.

        A fork's record comes back at once with its pid pending; forked() or unforked() follow on the zygote's
        answer, its death, or its silence past FORK_TIMEOUT.
        """
        asked = time.monotonic()
        z = self.current
        if z is not None and z.state == "ready" and z.generation == generation and slot not in self._spawn_next:
            w = self._ask(z, slot, generation)
            if w is not None:
                self._time_boot(w, "fork", asked)
                return w
        self._spawn_next.discard(slot)
        w = self._spawn(slot, generation)
        self.spawned += 1
        self._time_boot(w, "spawn", asked)
        return w

    def _ask(self, z: Zygote, slot: int, generation: int) -> WorkerProcess | None:
        """Send z a fork request with the worker's channel end and ack board; its record, pid pending (None: no)."""
        master_end, worker_end, board_fd, board = new_ends(slot)
        token = next(self._tokens)
        request = wire.encode_json(wire.FORK, {"token": token, "settings": dict(self.settings(), slot=slot)})
        try:
            wire.send_fds(z.channel, request, [worker_end.fileno(), board_fd])
        except OSError as exc:  # its queue is full (it is hung) or it is gone
            master_end.close()
            os.close(board_fd)
            self._hung(z, f"cannot send it a fork request: {exc}")
            return None
        except BaseException:
            os.close(board_fd)
            raise
        finally:
            worker_end.close()
        w = WorkerProcess(slot, generation, PendingFork(token), master_end, Link(slot, master_end, board), -1,
                          now=self.clock())
        w.board_fd = board_fd  # kept, as for a spawned worker: its peers map it (PEERS), closed when reaped
        z.pending[token] = (w, self.loop.call_later(FORK_TIMEOUT, self._no_answer, z))
        return w

    def _answered(self, z: Zygote, kind: int, body: dict) -> None:
        """FORKED (a pid, or why the fork failed) or FORK_REFUSED for one of z's fork requests."""
        w, timer = z.pending.pop(body.get("token"), (None, None))
        if w is None:
            return  # answered after its deadline: that worker was spawned (and this one sees EOF)
        timer.cancel()
        pid = body.get("pid")
        if kind == wire.FORK_REFUSED:
            if z.state == "ready":  # said once, however many requests were in flight
                z.error = f"refuses to fork: {body.get('reason')}"
                log.error("zygote pid=%d %s; workers of generation %d are spawned as without --preload",
                          z.pid, z.error, z.generation)
                z.stop()
                z.state = "refusing"
        elif isinstance(pid, int) and pid > 0:
            try:
                proc, exit_fd = z.adopt(pid)
            except OSError as exc:  # out of fds: it sees EOF on its channel and leaves; the reaper takes it
                log.error("cannot watch worker pid=%d forked by the zygote (%s); this worker is spawned", pid, exc)
            else:
                self.forked += 1
                self.supervisor.forked(w, proc, exit_fd)
                return
        else:
            log.error("zygote pid=%d: fork failed: %s; this worker is spawned", z.pid, body.get("error", "bad answer"))
        self._spawn_next.add(w.slot)
        self.supervisor.unforked(w)

    def _no_answer(self, z: Zygote) -> None:
        """A fork request's deadline passed unanswered: the zygote is hung."""
        self._hung(z, f"no answer to a fork within {FORK_TIMEOUT:g}s")

    def _hung(self, z: Zygote, why: str) -> None:
        """Kill z (the current one is restarted once reaped) and spawn every worker it was asked for."""
        if z.state in ("ready", "importing"):
            log.error("zygote pid=%d: %s; killing it, its workers are spawned", z.pid, why)
            z.error = why
            z.state = "hung"
            z.signal(signal.SIGKILL)
        self._unfork_all(z)

    def _unfork_all(self, z: Zygote) -> None:
        """z will answer none of its fork requests: each worker's record goes, and its slot is started again."""
        pending, z.pending = z.pending, {}
        for w, timer in pending.values():
            timer.cancel()
            self.supervisor.unforked(w)

    def _time_boot(self, w: WorkerProcess, how: str, asked: float) -> None:
        """Keep how long w took from the spawn request to READY."""
        def record(ready: asyncio.Future) -> None:
            # Not for a fork that did not happen: its ready future is the spawned stand-in's during start().
            if not ready.cancelled() and ready.exception() is None and w.reason != "unforked":
                self.boot_times[how].append(time.monotonic() - asked)
        w.ready.add_done_callback(record)

    # ---- reporting ----------------------------------------------------------------------------

    def status(self) -> dict:
        """For `balancer status`: the current zygote, how workers were started, the last reload's import error."""
        z = self.current
        boots = {how: round(median(times), 4) if times else None for how, times in self.boot_times.items()}
        return {"pid": z.pid if z is not None and z.state != "exited" else None,
                "generation": z.generation if z is not None else None,
                "state": z.state if z is not None else "off",
                "import_seconds": z.import_seconds if z is not None else None,
                "error": z.error if z is not None else "",
                "next_pid": self.next.pid if self.next is not None else None,
                "retired": [r.pid for r in self.retired], "restarts": self.restarts,
                "forked": self.forked, "spawned": self.spawned, "boot_p50": boots,
                "boot_seconds": {how: [round(t, 4) for t in times] for how, times in self.boot_times.items()},
                "reload_error": self.reload_error}

    def collect(self):
        """balancer_zygote_* for the master's Prometheus registry."""
        from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

        z = self.current
        up = z is not None and z.state == "ready"
        yield GaugeMetricFamily("balancer_zygote_up", "1 while a zygote (--preload) is ready to fork workers.",
                                value=int(up))
        if z is not None:
            yield GaugeMetricFamily("balancer_zygote_generation", "Code generation of the current zygote.",
                                    value=z.generation)
            yield GaugeMetricFamily("balancer_zygote_pid", "Process id of the current zygote.", value=z.pid)
            if z.import_seconds is not None:
                yield GaugeMetricFamily("balancer_zygote_import_seconds",
                                        "Seconds the current zygote took to import the backend.",
                                        value=z.import_seconds)
        yield CounterMetricFamily("balancer_zygote_restarts", "Zygotes that died and were restarted.",
                                  value=self.restarts)
        started = CounterMetricFamily("balancer_workers_started", "Workers started, by how: forked by a zygote, "
                                      "or spawned (while no zygote could fork).", labels=["how"])
        started.add_metric(["fork"], self.forked)
        started.add_metric(["spawn"], self.spawned)
        yield started
