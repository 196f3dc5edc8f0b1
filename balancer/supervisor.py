"""The worker pool as one table of process records, reconciled toward the desired size and code generation."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections import Counter
from typing import Callable

from balancer import wire
from balancer.backoff import Backoff
from balancer.config import Config
from balancer.dispatch import Dispatcher
from balancer.pool import Wanted, plan
from balancer.process import BootError, Phase, WorkerProcess, describe_exit, spawn_process, worker_env
from balancer.supervisor_channel import WorkerChannels
from balancer.supervisor_ends import KILL_GRACE, WorkerEnds  # noqa: F401 (KILL_GRACE: read from here too)

log = logging.getLogger("balancer")

# Leaving on purpose: an exit for one of these reasons is neither a crash nor a failed boot.
DISMISSED = frozenset(("scale", "shutdown"))

Spawn = Callable[[int, int], WorkerProcess]  # (slot, generation) -> a started worker's record


class Supervisor(WorkerChannels, WorkerEnds):
    """Keeps `target` slots served by ready workers of the newest generation, replacing them without a gap.

    Every worker process has one record in `table` (pid -> WorkerProcess) with an explicit phase; everything
    else (who serves a slot, what is being replaced, what drains) is derived from it. Events (exit, READY,
    heartbeat, refusal) only update records; `reconcile` then moves the pool toward the desired one, as
    gunicorn's manage_workers does, and runs again on every tick, so nothing depends on one edge being seen.
    """

    def __init__(self, config: Config, dispatcher: Dispatcher, on_capacity: Callable[[], None],
                 spawn: Spawn | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.dispatcher = dispatcher
        self.on_capacity = on_capacity  # a worker became ready or freed a connection
        # A worker gave back an idle keep-alive connection: on_return(link, fd, family, client address) owns the
        # fd from then on (balancer/parking.py); None closes it (tests without a master).
        self.on_return: Callable | None = None
        self.loop = asyncio.get_running_loop()
        self.clock = clock
        self.table: dict[int, WorkerProcess] = {}  # pid -> record, for every process not yet reaped
        self.target = config.workers
        self.generation = 0  # the code generation every slot should run; a reload raises it
        self.failed_generation = -1  # a generation whose replacement could not boot: not retried until asked
        self.backoffs: dict[int, Backoff] = {}
        self.not_before: dict[int, float] = {}  # slot -> earliest time its next worker may start
        self.restarts: Counter = Counter()  # (slot, reason) -> count
        self.on_exit_hooks: list[Callable[[WorkerProcess], None]] = []
        self.started_up = False  # the first workers are all ready: from now on reconcile keeps the pool
        self.stopping = False
        self.on_reload_hooks: list[Callable[[bool], None]] = []  # once per answered reload: done, or stopped
        self._reload_waiters: list[asyncio.Future] = []  # every request of the reload under way
        # The wake-up asked for and when it is due, on self.clock: the due time is kept here because uvloop's
        # call_later(0) returns a plain Handle, which has no when().
        self._wakeup: asyncio.Handle | None = None
        self._wake_due = 0.0
        self._reconciling = False
        self._again = False
        self._all_gone = asyncio.Event()
        self._all_gone.set()
        if spawn is None:
            settings, env = config.worker_settings(), worker_env()
            spawn = lambda slot, generation: spawn_process(slot, generation, settings, env)  # noqa: E731
        self._spawn = spawn
        self._inbox = wire.inbox()  # one receive buffer for every worker's channel
        self._peers_told: tuple | None = None  # the ready workers (pids) the last PEERS messages named

    # ---- views of the table -------------------------------------------------------------------

    def records(self) -> list[WorkerProcess]:
        """Every worker process not yet reaped, in slot order, oldest first within a slot."""
        return sorted(self.table.values(), key=lambda w: (w.slot, w.started, w.pid))

    def serving(self, slot: int) -> WorkerProcess | None:
        """The newest ready worker of slot."""
        best = None
        for w in self.table.values():
            if w.slot == slot and w.phase is Phase.READY and (best is None or w.started > best.started):
                best = w
        return best

    @property
    def reload_failed(self) -> bool:
        """True while the newest generation asked for is one whose replacement could not boot."""
        return self.failed_generation >= self.generation

    @property
    def slots(self) -> list[WorkerProcess | None]:
        """The worker serving each wanted slot (None: none ready)."""
        return [self.serving(slot) for slot in range(self.target)]

    # ---- spawning and events ------------------------------------------------------------------

    def spawn_worker(self, slot: int) -> WorkerProcess:
        """Start a worker for slot at the wanted generation; watch its channel and its exit.

        A worker forked by a zygote (--preload) is recorded at once, booting, before the zygote has said its pid:
        the master never waits for it. It is watched from forked() on; until then its channel keeps what it sends.
        """
        w = self._spawn(slot, self.generation)
        self.adopt(w)
        log.debug("spawned worker slot=%d pid=%d generation=%d", slot, w.pid, w.generation)
        return w

    def _watch(self, w: WorkerProcess) -> None:
        """Read its channel (unless it has ended) and see its exit."""
        if w.channel.fileno() >= 0:
            self.loop.add_reader(w.channel.fileno(), self._on_channel, w)
        self.loop.add_reader(w.exit_fd, self._on_exit, w)

    def forked(self, w: WorkerProcess, proc, exit_fd: int) -> None:
        """The zygote said which process it forked for w: key the record by its pid and watch it."""
        if self.table.get(w.pid) is not w:  # never (a fork is forgotten before its record goes), but if so: no phantom
            proc.send_signal(signal.SIGKILL)  # the orphan reaper reaps it
            os.close(exit_fd)
            return
        del self.table[w.pid]
        w.born(proc, exit_fd)
        self.table[w.pid] = w
        self._watch(w)  # a READY it sent meanwhile is read now
        self.changed()

    def unforked(self, w: WorkerProcess) -> None:
        """A fork that did not happen (refused, failed, the zygote hung or died): w goes, and its slot starts again.

        Not a crash: nothing backs off. During start() the slot's new worker stands in for w, whose ready future
        start() is waiting on.
        """
        if self.table.get(w.pid) is not w:
            return
        w.reason = w.reason or "unforked"
        w.exited = True  # no process to wait for
        if not self.started_up and not self.stopping:
            try:
                heir = self.spawn_worker(w.slot)
            except OSError as exc:
                w.ready.set_exception(BootError(f"cannot start a worker: {exc}"))
            else:
                heir.ready.add_done_callback(lambda ready: _settle_as(w.ready, ready))
        elif not w.ready.done():
            w.ready.set_exception(BootError("its fork did not happen"))
            w.ready.exception()  # retrieved: nobody may be waiting
        self._gone(w, None)

    def adopt(self, w: WorkerProcess) -> None:
        """Put a started worker in the table and watch it (also one a master upgrade carried).

        A worker forked by a zygote whose pid is still pending is watched from forked() on.
        """
        self.table[w.pid] = w
        self._all_gone.clear()
        if not w.pending:
            self._watch(w)
        self.dispatcher.set_links([r.link for r in self.records()])

    def _on_exit(self, w: WorkerProcess) -> None:
        """Reap a worker: read what it left on its channel, drop its record, remember what its slot needs."""
        if w.proc.poll() is None:
            return
        self.loop.remove_reader(w.exit_fd)
        os.close(w.exit_fd)
        if w.board_fd >= 0:  # the master's mapping of its board stays for the figures it folds
            os.close(w.board_fd)
            w.board_fd = -1
        self._read_channel(w)  # its last refusals and final heartbeat, before evicting and folding
        code = w.proc.returncode
        if not w.ready.done():
            w.ready.set_exception(BootError(f"worker exited with {describe_exit(code)} before it was ready"))
            w.ready.exception()
        self._gone(w, code)

    def _gone(self, w: WorkerProcess, code: int | None) -> None:
        """Drop w's record (its process reaped, or never there): fds it never took go elsewhere, its slot is seen to."""
        self._close_channel(w)
        if w.board_fd >= 0:  # a fork that never was (unforked) kept its board's fd too
            os.close(w.board_fd)
            w.board_fd = -1
        was, slot = w.phase, w.slot
        w.exited = True
        w.phase = Phase.EXITED
        del self.table[w.pid]
        for hook in self.on_exit_hooks:
            try:
                hook(w)
            except Exception:
                log.exception("exit hook failed for worker slot=%d pid=%d", slot, w.pid)
        if w.reason == "unforked":
            log.debug("worker slot=%d was not forked; starting another", slot)
        elif was is Phase.DRAINING or w.reason in DISMISSED or self.stopping:
            how = w.reason or "stopped"
            log.info("worker slot=%d pid=%d exited (%s)", slot, w.pid, how if code == 0 else f"{how}, {describe_exit(code)}")
        elif was is Phase.BOOTING:
            self._boot_failed(w, code)
        else:
            reason = w.reason or "crash"
            self.restarts[(slot, reason)] += 1
            delay = self._back_off(slot, self.clock() - w.started)
            log.warning("worker slot=%d pid=%d died (%s, %s); respawning in %.2fs",
                        slot, w.pid, reason, describe_exit(code), delay)
        if not self.table:
            self._all_gone.set()
        self.changed()

    def _boot_failed(self, w: WorkerProcess, code: int | None) -> None:
        """A worker died before READY: a failed replacement stops its reload; an empty slot backs off."""
        if not self.started_up:
            return  # start() reports it
        old = self.serving(w.slot)
        delay = self._back_off(w.slot, 0.0)
        if old is not None:
            if w.generation > old.generation:
                self.failed_generation = w.generation
                log.error("replacement for slot=%d failed (%s); reload stopped at slot=%d; old workers keep serving",
                          w.slot, describe_exit(code), w.slot)
            else:
                log.error("replacement for slot=%d failed (%s); keeping the old worker, retrying in %.2fs",
                          w.slot, describe_exit(code), delay)
        else:
            log.warning("worker slot=%d pid=%d exited before it was ready (%s); respawning in %.2fs",
                        w.slot, w.pid, describe_exit(code), delay)

    def crash_looping(self, slot: int, now: float) -> bool:
        """True when slot is wanted and its workers keep dying soon after they start (Backoff.crash_looping)."""
        backoff, serving = self.backoffs.get(slot), self.serving(slot)
        if backoff is None or slot >= self.target:
            return False
        if self.reload_failed and serving is not None and serving.generation < self.generation:
            return False  # a failed reload's replacements died, not the worker that serves on
        return backoff.crash_looping(None if serving is None else now - serving.started)

    def _back_off(self, slot: int, uptime: float) -> float:
        """Record a failure of slot; its next worker waits the returned delay."""
        delay = self.backoffs.setdefault(slot, Backoff()).failure(uptime)
        self.not_before[slot] = self.clock() + delay
        return delay

    # ---- reconcile ----------------------------------------------------------------------------

    def changed(self) -> None:
        """Something in the table changed: reconcile now (once, however deeply this is re-entered).

        A pass that raises is logged and left to the next tick, which reconciles again: an event callback or a
        wake-up must not die of it, and the dispatcher must still see the table as it is.
        """
        if self._reconciling:
            self._again = True
            return
        self._reconciling = True
        try:
            self._again = True
            while self._again:
                self._again = False
                self.reconcile()
        except Exception:
            log.exception("reconcile failed; it runs again at the next tick")
        finally:
            self._reconciling = False
            self.dispatcher.set_links([w.link for w in self.records()])
        self.tell_peers()
        self.on_capacity()

    def reconcile(self) -> None:
        """Move the real pool one step toward the wanted one: size `target`, every slot at `generation`."""
        if self.started_up or self.stopping:  # before, start() boots the first workers and reports failures
            wanted = Wanted(self.target, self.generation, self.failed_generation, self.stopping)
            steps = plan(self.records(), wanted, self.not_before, self.clock())
            for w, reason in steps.drain:
                if reason in ("reload", "recycle", "scale"):  # scale: a serving worker retired by a scale-down
                    self.restarts[(w.slot, reason)] += 1
                self.drain(w, reason)
            for w, reason in steps.dismiss:
                self._dismiss(w, reason, signal.SIGTERM if reason == "shutdown" else signal.SIGKILL)
            for slot in steps.spawn:
                self._start(slot)
            for at in steps.wait.values():
                self._wake_at(at)
            for slot in [s for s in self.not_before if s >= self.target]:
                del self.not_before[slot]
        self._settle_reloads()

    def _start(self, slot: int) -> None:
        """Spawn for slot; when the system cannot start one now, back off and retry."""
        try:
            self.spawn_worker(slot)
        except OSError as exc:  # out of fds or processes: not the backend's fault
            delay = self._back_off(slot, 0.0)
            log.error("cannot start a worker for slot=%d (%s); retrying in %.2fs", slot, exc, delay)
            self._wake_at(self.not_before[slot])

    def _wake_at(self, when: float) -> None:
        """Reconcile again at `when`, a time on self.clock (the tick would too, later)."""
        if self._wakeup is not None:
            if self._wake_due <= when:
                return
            self._wakeup.cancel()
        self._wake_due = when
        self._wakeup = self.loop.call_later(max(0.0, when - self.clock()), self._woken)

    def _woken(self) -> None:
        self._wakeup = None
        self.changed()

    def _settle_reloads(self) -> None:
        """Answer the reload requests once every slot serves the newest generation asked for, or the reload stopped.

        A reload asked during another is the same reload, to a newer generation: every request is answered
        together, so neither `reload --wait` nor systemd's READY=1 says done while a slot still runs code older
        than the last ask, nor "stopped" for an older generation's failed replacement the newer one went past.
        """
        if not self._reload_waiters:
            return
        serving = self.slots
        done_to = min((w.generation for w in serving if w is not None), default=-1)
        full = all(w is not None and not w.recycle for w in serving)
        if self.stopping or self.reload_failed:
            done = False
        elif full and done_to >= self.generation:
            done = True
        else:
            return
        waiters, self._reload_waiters = self._reload_waiters, []
        for future in waiters:
            if not future.done():  # a caller may have cancelled its own wait
                future.set_result(done)
        if done:
            log.info("rolling reload done (generation %d)", done_to)
        for hook in self.on_reload_hooks:
            try:
                hook(done)
            except Exception:
                log.exception("reload hook failed")

    # ---- start, reload, scale -------------------------------------------------------------------

    async def start(self) -> None:
        """Spawn every slot and wait until all are ready; BootError if any cannot boot."""
        for slot in range(self.target):
            try:
                self.spawn_worker(slot)
            except OSError as exc:
                raise BootError(f"cannot start a worker: {exc}") from None
        waiters = [w.ready for w in self.records()]
        # asyncio.wait, not gather: cancelled by a signal during boot, gather would cancel the workers' ready
        # futures and leave its own outcome unretrieved (logged as an error at shutdown).
        done, pending = await asyncio.wait(waiters, timeout=self.config.boot_timeout,
                                           return_when=asyncio.FIRST_EXCEPTION)
        for ready in done:
            ready.result()  # a BootError: the first worker that could not boot
        if pending:
            raise BootError(f"workers not ready within --boot-timeout {self.config.boot_timeout:g}s")
        self.started_up = True
        self.changed()

    def request_reload(self) -> asyncio.Future:
        """Ask for every slot to run fresh code; the future says True when all do, False if the reload stopped.

        Asked during a reload, it raises the wanted generation: the running pass continues to it, and slots it
        already replaced are replaced once more, so every worker ends up on code read after the last ask. The
        earlier requests are answered with this one.
        """
        future = self.loop.create_future()
        self._reload_waiters.append(future)
        if self.stopping:
            self._settle_reloads()  # answered False now, and the hooks told (READY=1 after RELOADING=1)
            return future
        self.generation += 1
        log.info("rolling reload of %d workers (generation %d)", self.target, self.generation)
        self.changed()
        return future

    def scale(self, n: int) -> None:
        """Grow or shrink to n workers at runtime."""
        if n < 1 or self.stopping or n == self.target:
            return
        old, self.target = self.target, n
        log.info("scaling from %d to %d workers", old, n)
        self.changed()


def _settle_as(target: asyncio.Future, source: asyncio.Future) -> None:
    """Give target the outcome source had (start() waits on a record that another stands in for)."""
    if target.done():
        return
    if source.cancelled():
        target.cancel()
    elif source.exception() is not None:
        target.set_exception(source.exception())
    else:
        target.set_result(source.result())
