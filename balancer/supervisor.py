"""Spawn, reap and replace worker processes: respawn with backoff, rolling reload, recycle, scale."""

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
from balancer.dispatch import Dispatcher, State
from balancer.process import BootError, WorkerProcess, describe_exit, rss_bytes, spawn_process, worker_env

log = logging.getLogger("balancer")

KILL_GRACE = 2.0  # seconds between SIGABRT/graceful deadline and SIGKILL


class Supervisor:
    """Keeps `target` workers serving, one per slot, and replaces them without a gap."""

    def __init__(self, config: Config, dispatcher: Dispatcher, on_capacity: Callable[[], None]) -> None:
        self.config = config
        self.dispatcher = dispatcher
        self.on_capacity = on_capacity  # a worker became ready or freed a connection
        self.loop = asyncio.get_running_loop()
        self.target = config.workers
        self.slots: list[WorkerProcess | None] = [None] * self.target
        self.replacing: dict[int, WorkerProcess] = {}
        self.retiring: set[WorkerProcess] = set()
        self.backoffs: dict[int, Backoff] = {}
        self.restarts: Counter = Counter()  # (slot, reason) -> count
        self.on_exit_hooks: list[Callable[[WorkerProcess], None]] = []
        self.stopping = False
        self.reloading = False
        self._respawns: dict[int, asyncio.TimerHandle] = {}
        self._all_gone = asyncio.Event()
        self._env = worker_env()
        self._inbox = wire.inbox()  # one receive buffer for every worker's channel

    # ---- process lifecycle ----------------------------------------------------------------------

    def spawn_worker(self, slot: int) -> WorkerProcess:
        """Start a worker for slot and watch its channel and its exit."""
        w = spawn_process(slot, self.config.worker_settings(), self._env)
        self._all_gone.clear()
        self.loop.add_reader(w.channel.fileno(), self._on_channel, w)
        self.loop.add_reader(w.pidfd, self._on_exit, w)
        log.debug("spawned worker slot=%d pid=%d", slot, w.pid)
        return w

    def processes(self) -> list[WorkerProcess]:
        """Every live worker process: serving, booting replacements and retiring ones."""
        out = [w for w in self.slots if w is not None]
        out.extend(self.replacing.values())
        out.extend(self.retiring)
        return out

    def _on_channel(self, w: WorkerProcess) -> None:
        """Read every message waiting on a worker's channel."""
        while True:
            try:
                msg, fds, _ = wire.recv_message(w.channel, self._inbox)
            except BlockingIOError:
                return
            except OSError:
                msg, fds = b"", []
            if fds:  # workers never send fds; never let one leak into the master
                wire.close_all(fds)
            if not msg:
                self._channel_closed(w)
                return
            try:
                self._on_message(w, msg)
            except wire.ProtocolError as exc:
                log.error("worker slot=%d pid=%d sent a bad message (%s); killing it", w.slot, w.pid, exc)
                w.signal(signal.SIGKILL)
                self._channel_closed(w)
                return

    def _on_message(self, w: WorkerProcess, msg: bytes) -> None:
        """Act on one message from a worker."""
        kind = msg[0]
        if kind == wire.BEAT:
            w.last_beat = time.monotonic()
            body = wire.decode_json(msg)
            w.stats = body
            if body.get("recycle") and w.route.state is State.READY and w is self.slots[w.slot]:
                self.loop.create_task(self.replace(w.slot, "recycle"))
        elif kind == wire.READY:
            w.last_beat = time.monotonic()
            w.route.state = State.READY
            if not w.ready.done():
                w.ready.set_result(True)
            log.info("worker slot=%d pid=%d ready", w.slot, w.pid)
            self.on_capacity()
        elif kind == wire.REFUSE:
            self.dispatcher.on_refuse(w.route, wire.decode_ids(msg))
            self.on_capacity()
        elif kind == wire.BOOT_ERROR:
            text = str(wire.decode_json(msg))
            if not w.ready.done():
                w.ready.set_exception(BootError(text))
                w.ready.exception()  # mark retrieved: a respawn may have nobody awaiting it
            log.error("worker slot=%d pid=%d failed to boot: %s", w.slot, w.pid, text)
        else:
            raise wire.ProtocolError(f"unknown message type {kind:#x}")

    def _channel_closed(self, w: WorkerProcess) -> None:
        """The worker's end is gone: hand its unacked fds to others now, before the reap."""
        if w.route.state is State.DEAD and w.channel.fileno() < 0:
            return
        self.loop.remove_reader(w.channel.fileno())
        self.loop.remove_writer(w.channel.fileno())
        w.route.state = State.DEAD
        pending = self.dispatcher.evict(w.route)  # counted after its last acks are read: those stay its own
        if pending:
            log.info("re-dispatched %d unacknowledged connections of worker slot=%d pid=%d",
                     pending, w.slot, w.pid)
        w.channel.close()
        self.on_capacity()

    def _on_exit(self, w: WorkerProcess) -> None:
        """Reap a worker and decide what its slot needs next."""
        if w.proc.poll() is None:
            return
        w.exited = True
        self.loop.remove_reader(w.pidfd)
        os.close(w.pidfd)
        if w.channel.fileno() >= 0:
            self._on_channel(w)  # take its last refusals before evicting: they tell taken fds from refused
            self._channel_closed(w)
        code = w.proc.returncode
        if not w.ready.done():
            w.ready.set_exception(BootError(f"worker exited with {describe_exit(code)} before it was ready"))
            w.ready.exception()
        for hook in self.on_exit_hooks:
            hook(w)
        slot = w.slot
        if w in self.retiring:
            self.retiring.discard(w)
            log.info("worker slot=%d pid=%d exited (%s)", slot, w.pid, w.reason)
        elif self.replacing.get(slot) is w:
            del self.replacing[slot]
        elif slot < len(self.slots) and self.slots[slot] is w:
            self._seat(slot, None)
            if not self.stopping:
                reason = w.reason or "crash"
                self.restarts[(slot, reason)] += 1
                uptime = time.monotonic() - w.started
                delay = self.backoffs.setdefault(slot, Backoff()).failure(uptime)
                log.warning("worker slot=%d pid=%d died (%s, %s); respawning in %.2fs",
                            slot, w.pid, reason, describe_exit(code), delay)
                self._respawns[slot] = self.loop.call_later(delay, self._respawn, slot)
        if not self.processes():
            self._all_gone.set()

    def _seat(self, slot: int, w: WorkerProcess | None) -> None:
        """Make w the worker serving slot (None: empty), for the supervisor and the dispatcher alike."""
        self.slots[slot] = w
        self.dispatcher.set_route(slot, w.route if w is not None else None)

    def _respawn(self, slot: int) -> None:
        """Start a new worker in an empty slot; when the system cannot start one now, retry later."""
        self._respawns.pop(slot, None)
        if self.stopping or slot >= self.target or self.slots[slot] is not None:
            return
        try:
            w = self.spawn_worker(slot)
        except OSError as exc:  # out of fds or processes (EMFILE, ENFILE, EAGAIN, ENOMEM): not the backend's fault
            delay = self.backoffs.setdefault(slot, Backoff()).failure(0.0)
            log.error("cannot start a worker for slot=%d (%s); retrying in %.2fs", slot, exc, delay)
            self._respawns[slot] = self.loop.call_later(delay, self._respawn, slot)
            return
        self._seat(slot, w)

    # ---- start, replace, scale --------------------------------------------------------------

    async def start(self) -> None:
        """Spawn every slot and wait until all are ready; BootError if any cannot boot."""
        for slot in range(self.target):
            try:
                w = self.spawn_worker(slot)
            except OSError as exc:
                raise BootError(f"cannot start a worker: {exc}") from None
            self._seat(slot, w)
        waiters = [w.ready for w in self.slots if w is not None]
        # asyncio.wait, not gather: cancelled by a signal during boot, gather would cancel the workers' ready
        # futures and leave its own outcome unretrieved (logged as an error at shutdown).
        done, pending = await asyncio.wait(waiters, timeout=self.config.boot_timeout,
                                           return_when=asyncio.FIRST_EXCEPTION)
        for ready in done:
            ready.result()  # a BootError: the first worker that could not boot
        if pending:
            raise BootError(f"workers not ready within --boot-timeout {self.config.boot_timeout:g}s")

    async def replace(self, slot: int, reason: str) -> bool:
        """Start a replacement for slot, wait until ready, then drain the old worker."""
        if self.stopping or slot in self.replacing or slot >= self.target:
            return False
        try:
            new = self.spawn_worker(slot)
        except OSError as exc:
            log.error("cannot start a replacement for slot=%d (%s); keeping the old worker", slot, exc)
            return False
        self.replacing[slot] = new
        try:
            await asyncio.wait_for(asyncio.shield(new.ready), self.config.boot_timeout)
        except (BootError, asyncio.TimeoutError) as exc:
            if self.stopping:
                return False  # shutdown interrupted the reload: nothing failed
            log.error("replacement for slot=%d failed (%s); keeping the old worker",
                      slot, exc or "not ready within --boot-timeout")
            self._kill_now(new)
            return False
        if self.replacing.get(slot) is not new:
            return False
        del self.replacing[slot]
        old = self.slots[slot]
        self._seat(slot, new)
        self.on_capacity()
        if old is not None:
            self.restarts[(slot, reason)] += 1
            self.drain(old, reason)
        return True

    async def rolling_reload(self) -> bool:
        """Replace every slot one at a time; stop at the first replacement that cannot boot."""
        if self.reloading:
            log.info("reload already in progress")
            return False
        self.reloading = True
        try:
            log.info("rolling reload of %d workers", self.target)
            for slot in range(self.target):
                if self.slots[slot] is None:
                    continue  # respawning anyway, with fresh code
                if not await self.replace(slot, "reload"):
                    if self.stopping:
                        log.info("reload stopped at slot=%d: shutting down", slot)
                    else:
                        log.error("reload stopped at slot=%d; old workers keep serving", slot)
                    return False
            log.info("rolling reload done")
            return True
        finally:
            self.reloading = False

    def scale(self, n: int) -> None:
        """Grow or shrink to n workers at runtime."""
        if n < 1 or self.stopping:
            return
        old = self.target
        self.target = n
        if n > old:
            self.slots.extend([None] * (n - old))
            for slot in range(old, n):
                self._respawn(slot)
        else:
            for slot in range(n, old):
                w = self.slots[slot]
                if slot in self._respawns:
                    self._respawns.pop(slot).cancel()
                if w is not None:
                    self.drain(w, "scale")
                if slot in self.replacing:
                    self._kill_now(self.replacing.pop(slot))
            del self.slots[n:]
            self.dispatcher.truncate(n)
        log.info("scaled from %d to %d workers", old, n)

    def drain(self, w: WorkerProcess, reason: str) -> None:
        """Stop giving w connections and tell it to finish in-flight requests and exit."""
        if w.slot < len(self.slots) and self.slots[w.slot] is w:
            self.slots[w.slot] = None
        w.reason = w.reason or reason
        w.route.state = State.DRAINING
        self.retiring.add(w)
        w.kill_at = time.monotonic() + self.config.graceful_timeout + KILL_GRACE
        try:
            wire.send_fds(w.channel, bytes((wire.DRAIN,)), [])
        except OSError:
            w.signal(signal.SIGTERM)  # channel full or gone: the signal does the same

    def _kill_now(self, w: WorkerProcess) -> None:
        """Kill a worker that never served (failed replacement)."""
        if self.replacing.get(w.slot) is w:
            del self.replacing[w.slot]
        w.reason = w.reason or "failed"
        w.route.state = State.DRAINING
        self.retiring.add(w)
        w.signal(signal.SIGKILL)

    # ---- periodic checks ----------------------------------------------------------------------

    def tick(self) -> None:
        """Heartbeat and boot deadlines, kill deadlines for draining workers, memory recycling."""
        now = time.monotonic()
        for w in self.processes():
            if w.kill_at and now >= w.kill_at:
                log.warning("worker slot=%d pid=%d did not exit in time; SIGKILL", w.slot, w.pid)
                w.signal(signal.SIGKILL)
                w.kill_at = now + 60  # don't repeat every tick while the kernel reaps it
            elif w.kill_at:
                continue
            elif w.route.state is State.READY and now - w.last_beat > self.config.timeout:
                log.error("worker slot=%d pid=%d sent no heartbeat for %.1fs (--timeout %g); aborting it",
                          w.slot, w.pid, now - w.last_beat, self.config.timeout)
                self._abort(w, "timeout")
            elif w.route.state is State.BOOTING and now - w.started > self.config.boot_timeout:
                log.error("worker slot=%d pid=%d not ready within --boot-timeout; killing it", w.slot, w.pid)
                self._abort(w, "timeout")
        if self.config.max_memory and not self.stopping:
            limit = self.config.max_memory * 1024 * 1024
            for w in list(self.slots):
                if w is not None and w.route.state is State.READY and w.slot not in self.replacing:
                    if rss_bytes(w.pid) > limit:
                        log.warning("worker slot=%d pid=%d passed --max-memory %d MiB; recycling",
                                    w.slot, w.pid, self.config.max_memory)
                        self.loop.create_task(self.replace(w.slot, "recycle"))

    def _abort(self, w: WorkerProcess, reason: str) -> None:
        """SIGABRT now (a traceback-worthy death), SIGKILL if that does not do it."""
        w.reason = reason
        w.route.state = State.DRAINING  # its unacked fds are re-dispatched when it is reaped
        w.kill_at = time.monotonic() + KILL_GRACE
        w.signal(signal.SIGABRT)

    # ---- shutdown ---------------------------------------------------------------------------

    def kill_all(self) -> None:
        """SIGKILL every worker now (past the shutdown deadline, or a second stop signal)."""
        for w in self.processes():
            w.signal(signal.SIGKILL)

    async def shutdown(self) -> None:
        """Drain every worker and wait for all to exit; SIGKILL the ones past the deadline."""
        self.stopping = True
        for handle in self._respawns.values():
            handle.cancel()
        self._respawns.clear()
        for w in self.processes():
            if w.route.state is State.BOOTING or w in self.replacing.values():
                w.reason = "shutdown"
                w.signal(signal.SIGTERM)
                w.kill_at = time.monotonic() + KILL_GRACE
            elif w not in self.retiring:
                self.drain(w, "shutdown")
        if not self.processes():
            return
        deadline = self.config.graceful_timeout + 2 * KILL_GRACE + 1
        try:
            await asyncio.wait_for(self._all_gone.wait(), deadline)
        except asyncio.TimeoutError:
            self.kill_all()
            await asyncio.wait_for(self._all_gone.wait(), 5)
