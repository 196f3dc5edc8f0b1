"""The master's side of the supervisor's model test, and the promises it checks.

The real Supervisor and Dispatcher, wired as balancer/master.py wires them, on a real asyncio loop that the test
steps by hand with its timers on a fake clock, against fake workers (tests/fakeworker.py) on real socketpairs
and ack boards. tests/test_supervisor_model.py drives it with hypothesis; the checks here are the product's
promises: one connection, one worker; no record for a reaped process and no process without a record; a
rolling reload drains no worker before its replacement is ready, and reports done only once every slot serves the
newest generation asked for; counters never go backwards and match what the workers published; no callback or
reconcile pass raises; once faults stop the pool converges to its target on the newest code; shutdown ends within
the graceful timeout plus a small bound and leaves nothing open. With `preload`, the real Zygotes forks the
workers through fake zygotes (tests/fakezygote.py), and the zygotes' promises join in: a failed import touches no
worker, a worker forked but never answered for is no one's only with its channel closed, no zygote outlives its
generation, and the pool converges with a ready zygote of the newest code. Keep-alive rebalancing joins in as
balancer/master.py wires it (a Parking whose dispatch is the dispatcher, the supervisor's RETURNs parked, released
before a stop's drain and an upgrade's exec): a connection is the worker's that acked it, or in a RETURN on that
worker's channel, or parked in the master, or in flight to a worker, or homeless or held in the master, and only
one of these at a time; a returned one comes back flagged RESUMED with its client's address, served by one worker
at a time; a parked one whose client sent is dispatched at once; parking's counters add up.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import types
from collections import Counter

from balancer import dispatch, wire
from balancer import parking as parking_module
from balancer import zygote as zygotes_module
from balancer.accepting import AcceptPath
from balancer.config import Config
from balancer.dispatch import Dispatcher
from balancer.master import STALL_AFTER, TICK
from balancer.parking import Parking
from balancer.process import Phase
from balancer.supervisor import KILL_GRACE, Supervisor
from balancer.zygote import Zygotes
from balancer.zygote_process import STOP_GRACE
from tests.fakeworker import FakeClock, FakeTimeLoop, FakeWorker, make_worker, step
from tests.fakezygote import FakeZygote

WORKERS = 2
CAP = 8  # --worker-connections: small, so backpressure and homeless fds happen, and above what a channel holds
GRACEFUL = 5.0
TIMEOUT = 3.0  # heartbeat timeout
BOOT_TIMEOUT = 4.0
CONVERGE_WITHIN = 60.0  # fake seconds the pool gets to settle once faults stop (back-off caps at 10 s)
SHUTDOWN_BOUND = GRACEFUL + KILL_GRACE + 2 * TICK  # the drain, the SIGKILL grace, the tick that sees it
FIRST_PID = 1 << 30  # above any real pid: a stray signal could never reach a real process


class Conn:
    """One accepted connection: the client's end, and where it is (the worker that acked it, or its RETURN's)."""

    def __init__(self, client: socket.socket) -> None:
        self.client = client
        self.served_by: int | None = None  # the worker that acked it and serves it (kept once that worker died)
        self.acked: set[tuple[int, int]] = set()  # (id(link), conn id) of hand-offs of it a worker acked
        self.returning: int | None = None  # the worker whose RETURN of it the master has not read yet
        self.returns = 0  # times a worker gave it back
        self.peer = b""  # the client address its last RETURN carried
        self.parked_turn = 0  # the model's loop turn at which the master parked it
        self.closed_by_master = ""  # why the master closed it (expired, ended, returned at a stop, ...)
        self.client_closed = False  # the client closed its end (a peek reads nothing)
        self.sent = 0  # next requests its client sent


class ModelParking(Parking):
    """The product's Parking, telling the model which connections it closes (it counts them itself)."""

    def __init__(self, model: PoolModel, *args) -> None:
        super().__init__(*args)
        self.model = model

    def _close(self, fd: int) -> None:
        self.model._master_closes(fd, "closed parked")
        super()._close(fd)


class RaisedErrors(logging.Handler):
    """An exception the supervisor caught and logged (a failed reconcile pass or hook) is a violation too."""

    def __init__(self, violations: list[str]) -> None:
        super().__init__(logging.ERROR)
        self.violations = violations

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.violations.append(f"logged with a traceback: {record.getMessage()}: {record.exc_info[1]!r}")


class PoolModel:
    """A master's supervisor and dispatcher against fake workers; its check_* methods assert the promises."""

    preload = False  # True: the real Zygotes forks the workers through fake zygotes (--preload), as master.py wires it

    def __init__(self) -> None:
        super().__init__()
        self.done = False  # shut down: every rule is over
        self.auto = False  # every fake behaves at each loop turn (shutdown, and the teardown phase)
        self.clock = FakeClock()
        self.loop = FakeTimeLoop(self.clock)
        self.loop.set_exception_handler(self._loop_error)  # a callback that raised must fail the test, not log
        self._real_time = dispatch.time
        dispatch.time = types.SimpleNamespace(monotonic=self.clock)  # the dispatcher's ack-progress stamps
        self.fakes: dict[int, FakeWorker] = {}
        self.next_pid = FIRST_PID
        self.spawn_failures = 0
        self.conns: dict[int, Conn] = {}  # inode of the server end -> connection
        self.violations: list[str] = []
        self.reloads: list[tuple[int, asyncio.Future]] = []  # (the generation it reaches at least, its answer)
        self.failed_imports_before: dict[int, int] = {}  # id(answer) -> reload imports that had failed when asked
        self.seen: dict[str, int] = {}
        self.restarts_seen: Counter = Counter()
        self.gap_checked: set[int] = set()
        self.config = Config(workers=WORKERS, worker_connections=CAP, graceful_timeout=GRACEFUL, timeout=TIMEOUT,
                             boot_timeout=BOOT_TIMEOUT)
        self.dispatcher = Dispatcher(CAP, on_blocked=self._on_blocked)
        self._real_parking_time = parking_module.time
        parking_module.time = types.SimpleNamespace(monotonic=self.clock)  # Parked.since, expire()
        self.draining = False  # Master.draining: a stop began, RETURNs are closed
        self.upgrading = False  # an upgrade quiesces: parked connections are released at every turn
        self.turns = 0  # loop steps so far
        self.last_tick = self.clock()  # the master's last tick (its expire())
        self.released = 0  # parked connections handed out by release_all() (Parking counts them resumed)
        self.closed_all = 0  # ... and closed by close_all() (Parking counts them expired)
        self.closed_at_stop = 0  # RETURNs closed because the master was draining
        self.zygote_fakes: list[FakeZygote] = []
        self.import_failures = 0
        self.zygotes: Zygotes | None = None
        spawn = self._spawn
        if self.preload:
            self._real_is_subreaper = zygotes_module.is_subreaper
            zygotes_module.is_subreaper = lambda: True  # the fakes are "adopted" without the test being a subreaper
            self.zygotes = self.call(lambda: Zygotes(lambda: {"backend": "app:handler"}, {}, lambda: BOOT_TIMEOUT,
                                                     start=self._start_zygote, spawn=self._spawn, clock=self.clock))
            spawn = self.zygotes.spawn
        self.sup: Supervisor = self.call(lambda: Supervisor(self.config, self.dispatcher, self._on_capacity,
                                                            spawn=spawn, clock=self.clock))
        self.sup.on_reload_hooks.append(self.check_reload_done)  # as the master's READY=1 for systemd
        self.parking = ModelParking(self, self.loop, self._dispatch_resumed, self.dispatcher.peers,
                                    self.config.keepalive_timeout)
        self.sup.on_return = self._on_return
        if self.zygotes is not None:
            self.zygotes.bind(self.sup)
            self.zygotes.on_import_failed.append(self.check_import_failed)
        self._log_errors = RaisedErrors(self.violations)
        logging.getLogger("balancer").addHandler(self._log_errors)
        try:
            self.auto = True
            boot = self.loop.create_task(self._boot())
            for _ in range(10):
                if boot.done():
                    break
                self.pump()
            boot.result()
            self.auto = False
        except BaseException:
            self.cleanup()
            raise

    # ---- the master's side, as balancer/master.py wires it -------------------------------------

    async def _boot(self) -> None:
        """Master._start_pool: the zygote's import first, then the workers."""
        if self.zygotes is not None:
            await self.zygotes.boot()
        await self.sup.start()

    def _start_zygote(self, generation: int, settings: dict, env: dict):
        fake = FakeZygote(generation, self._new_pid(), self._new_pid, self._on_fork, self._on_serve)
        self.zygote_fakes.append(fake)
        return fake.handle

    def _new_pid(self) -> int:
        self.next_pid += 1
        return self.next_pid - 1

    def _on_fork(self, fake: FakeWorker) -> None:
        self.fakes[fake.pid] = fake
        fake.on_give_back = self._on_give_back

    def call(self, fn, *args):
        """Run fn inside the loop (the supervisor asks for the running loop)."""

        async def inside():
            return fn(*args)

        return self.loop.run_until_complete(inside())

    def _loop_error(self, loop, context: dict) -> None:
        """An exception escaped a reader callback or timer, or a future's exception was never retrieved."""
        exc = context.get("exception")
        self.violations.append(f"event loop: {context.get('message')}: {exc!r}")

    def _on_capacity(self) -> None:
        if self.dispatcher.homeless:
            self.dispatcher.retry_homeless()

    def _on_blocked(self, link) -> None:
        def writable() -> None:
            self.loop.remove_writer(link.channel.fileno())
            link.send_blocked = False
            self._on_capacity()

        self.loop.add_writer(link.channel.fileno(), writable)

    def _spawn(self, slot: int, generation: int):
        if self.spawn_failures:
            self.spawn_failures -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        pid = self._new_pid()
        record, fake = make_worker(slot, generation, pid, self.clock(), self._on_serve)
        fake.on_give_back = self._on_give_back
        self.fakes[pid] = fake
        return record

    # ---- keep-alive rebalancing, as balancer/master.py wires it (balancer/accepting.py) ----------------

    def _on_return(self, link, fd: int, family: int, peer: bytes) -> None:
        """The supervisor's on_return: the master's own (AcceptPath._on_return parks it, or closes it once the
        workers drain), watched by the model."""
        self._note_return(link, fd, family, peer)
        if self.draining:
            self._master_closes(fd, "returned during a stop")
            self.closed_at_stop += 1
        AcceptPath._on_return(self, link, fd, family, peer)

    def _dispatch_resumed(self, items: list[tuple[int, int]]) -> None:
        """The Parking's dispatch: the master's own (parked connections whose next request came go out as new
        ones do)."""
        AcceptPath._dispatch_resumed(self, items)

    def _pause(self) -> None:
        """AcceptPath's pause for room: arrive() stops accepting while connections are homeless."""

    def _watch_capacity(self) -> None:
        """AcceptPath's capacity poll: the model's ticks and the workers' messages retry the homeless."""

    def _arm_hold_timer(self) -> None:
        raise AssertionError("the fake workers' boards never make the dispatcher hold a connection")

    def release_parked(self) -> None:
        """Parking.release_all(), counted (before a stop's drain, at each turn of an upgrade's quiesce)."""
        self.released += len(self.parking.parked)
        self.parking.release_all()

    def _note_return(self, link, fd: int, family: int, peer: bytes) -> None:
        """The master read a RETURN: it must come from the worker that gave the connection back, as it was sent."""
        inode = os.fstat(fd).st_ino
        conn = self.conns.get(inode)
        record = next((w for w in self.sup.table.values() if w.link is link), None)
        owner = record and record.pid
        if record is not None and record.pending:  # --preload: the zygote has not said its pid yet
            owner = next((f.pid for f in self.fakes.values() if getattr(f, "token", None) == -record.pid), owner)
        if conn is None:
            self.violations.append(f"pid={owner} returned fd inode {inode} nobody accepted")
            return
        if conn.returning is None or conn.returning != owner:
            self.violations.append(f"connection {inode} came back from pid={owner}, given back by "
                                   f"{conn.returning} (served by {conn.served_by})")
        if family != socket.AF_UNIX or peer != conn.peer:
            self.violations.append(f"connection {inode} came back as family {family}, client {peer!r}: sent as "
                                   f"{socket.AF_UNIX}, {conn.peer!r}")
        conn.returning = None
        conn.parked_turn = self.turns

    def _master_closes(self, fd: int, why: str) -> None:
        conn = self.conns.get(os.fstat(fd).st_ino)
        if conn is not None:
            conn.closed_by_master = why

    def _on_give_back(self, fake: FakeWorker, inode: int, peer: bytes) -> None:
        """A fake sent a RETURN: the connection is in its channel, no longer its own."""
        conn = self.conns.get(inode)
        if conn is None or conn.served_by != fake.pid:
            self.violations.append(f"pid={fake.pid} gave back connection {inode} it did not serve: "
                                   f"{conn and conn.served_by}")
            return
        conn.served_by = None
        conn.returning = fake.pid
        conn.returns += 1
        conn.peer = peer

    def _on_serve(self, fake: FakeWorker, inodes: list[int]) -> None:
        for inode in inodes:
            conn = self.conns.get(inode)
            if conn is None:
                self.violations.append(f"worker pid={fake.pid} was handed fd inode {inode} nobody accepted")
            elif conn.served_by is not None:
                self.violations.append(f"connection {inode} served twice: by pid={conn.served_by}, then by "
                                       f"pid={fake.pid} ({self.fakes[conn.served_by].events} / {fake.events})")
            elif conn.returning is not None:
                self.violations.append(f"connection {inode} served by pid={fake.pid} while its RETURN from "
                                       f"pid={conn.returning} is unread")
            elif conn.closed_by_master:
                self.violations.append(f"connection {inode} served by pid={fake.pid} after the master closed it "
                                       f"({conn.closed_by_master})")
            else:
                also = [f.pid for f in self.fakes.values() if f is not fake and f.alive and inode in f.conns]
                if also:
                    self.violations.append(f"connection {inode} served by pid={fake.pid} and at once by {also}")
                family, peer = fake.last_handoff.get(inode, (None, None))
                want = (socket.AF_UNIX | wire.RESUMED, conn.peer) if conn.returns else (socket.AF_UNIX, None)
                if (family, peer) != want:
                    self.violations.append(f"connection {inode} (returned {conn.returns} times) handed to "
                                           f"pid={fake.pid} as family {family}, client {peer!r}: wanted {want}")
                conn.served_by = fake.pid
                conn.acked |= self._entries_of(inode, fake.pid)

    def _entries_of(self, inode: int, pid: int) -> set[tuple[int, int]]:
        """(id(link), conn id) of the master's copy of a connection pid just acked, kept until it collects the ack
        (conn ids are never reused)."""
        found = set()
        for w in self.sup.table.values():
            if w.pid == pid or w.pending:
                for conn_id, (fd, _family) in w.link.unacked.items():
                    if os.fstat(fd).st_ino == inode:
                        found.add((id(w.link), conn_id))
        return found

    def pump(self, rounds: int = 4) -> None:
        """Let fakes act on signals (and behave, in auto mode) and the loop run, a few times over."""
        # Drains are checked before any fake can act on them: a behaving worker drains and exits in one round.
        for _ in range(rounds):
            self.check_no_gap()
            for fake in list(self.fakes.values()):
                if self.auto:
                    fake.behave()
                else:
                    fake.react()
            for zygote in self.zygote_fakes:
                zygote.behave(import_ok=self.auto)  # a running zygote answers forks at once
            step(self.loop)
            self.turns += 1
        if self.upgrading:  # Upgrader.quiesce, at its next turn: what was parked meanwhile goes out
            self.release_parked()
        self.check_no_gap()

    def master_tick(self) -> None:
        """The master's periodic steps (Master._schedule_tick)."""
        self.call(self.sup.tick)
        if self.zygotes is not None:
            self.call(self.zygotes.tick)
        self.check_no_gap()
        self.call(self.dispatcher.collect_all)
        self.call(self.dispatcher.mark_overdue, self.clock(), STALL_AFTER)
        self.call(self.parking.expire)  # parked connections idle past --keepalive-timeout
        self.last_tick = self.clock()
        self.call(self._on_capacity)

    def advance(self, dt: float) -> None:
        """Time passes: running workers read their channels and beat, then the master ticks."""
        for fake in list(self.fakes.values()):
            if self.auto:
                fake.behave()
                if fake.running:
                    fake.close_conns(len(fake.conns))  # with faults over, clients finish too
            fake.run_loop()
        self.pump()
        self.clock.advance(dt)
        self.master_tick()
        self.check_counts()
        self.pump()

    def live(self, pred=lambda f: True) -> list[FakeWorker]:
        return [f for pid, f in sorted(self.fakes.items()) if f.alive and pred(f)]

    def pick(self, i: int, pred=lambda f: True) -> FakeWorker | None:
        fakes = self.live(pred)
        return fakes[i % len(fakes)] if fakes else None

    def arrive(self, sizes: list[int]) -> None:
        """Master._on_readable for each batch: collect acks, accept up to the free room, dispatch."""
        for size in sizes:
            self.call(self.dispatcher.collect_all)
            room = self.dispatcher.free_capacity()
            if room <= 0 or self.dispatcher.homeless:
                break  # accepting is paused: the kernel backlog holds them
            items = []
            for _ in range(min(size, room)):
                client, server = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                client.setblocking(False)
                inode = os.fstat(server.fileno()).st_ino
                self.conns[inode] = Conn(client)
                items.append((server.detach(), socket.AF_UNIX))
            self.call(self.dispatcher.dispatch, items)

    # ---- promises -----------------------------------------------------------------------------

    def ask_reload(self) -> None:
        """SIGHUP: through the zygotes with --preload (a new one imports first), else straight to the supervisor."""
        if self.zygotes is None:
            future = self.call(self.sup.request_reload)
            self.reloads.append((self.sup.generation, future))
        else:
            future = self.call(self.zygotes.reload)
            self.reloads.append((self.sup.generation + 1, future))
            self.failed_imports_before[id(future)] = self.import_failures

    def check_table(self) -> None:
        """No record for a reaped process, and none for a live one; the dispatcher sees exactly the table's workers.

        A fork the zygote has not answered yet has a record with its pid pending; its worker may already live
        (the answer is on its way).
        """
        pending = {-w.pid: w for w in self.sup.table.values() if w.pending}
        for pid, w in self.sup.table.items():
            if w.pending:
                continue
            fake = self.fakes[pid]
            assert fake.alive, f"record for pid={pid} (slot {w.slot}, {w.phase.value}) whose process exited " \
                               f"and was reaped: {fake.events}"
            assert fake.generation == w.generation, f"pid={pid} runs generation {fake.generation}, its record " \
                                                    f"says {w.generation}"
        for fake in self.live():
            assert fake.pid in self.sup.table or getattr(fake, "token", 0) in pending, \
                f"live worker pid={fake.pid} has no record: {fake} {fake.events}"
        links = {id(w.link) for w in self.sup.table.values()}
        stray = [link.slot for link in self.dispatcher.links if id(link) not in links]
        assert not stray, f"dispatcher links for slots {stray} belong to no record"

    def check_zygotes(self) -> None:
        """--preload: the pool wants the current zygote's generation; no zygote outlives its generation or is lost."""
        zg = self.zygotes
        if zg is None:
            return
        assert zg.current is not None and self.sup.generation == zg.current.generation, \
            f"the pool wants generation {self.sup.generation}, the current zygote is {zg.current}"
        live = {w.generation for w in self.sup.table.values()}
        for z in zg.retired:
            assert z.state != "ready" or z.generation in live, \
                f"zygote pid={z.pid} of generation {z.generation} lives on, no worker of it left: {z.fake}"
        for fake in self.zygote_fakes:
            assert fake.alive or fake.handle.state != "exited" or not fake.handle.pending, \
                f"forks {sorted(fake.handle.pending)} of the dead zygote pid={fake.pid} wait out their deadline"
            if fake.alive and fake.handle not in (zg.current, zg.next, *zg.retired):
                assert fake.handle.state in ("stopping", "refusing", "hung"), \
                    f"zygote pid={fake.pid} is no one's and was not told to go: {fake}"

    def check_import_failed(self) -> None:
        """Where a reload's import fails: the pool still wants the generation it had, no worker was touched."""
        self.import_failures += 1
        zg = self.zygotes
        if self.sup.generation != zg.current.generation:
            self.violations.append(f"a failed import moved the pool to generation {self.sup.generation}")
        for w in self.sup.table.values():
            if w.generation > zg.current.generation:
                self.violations.append(f"worker slot={w.slot} runs generation {w.generation} of a failed import")

    def master_places(self) -> list[tuple[str, int, int, tuple[int, int] | None]]:
        """Every copy of a connection the master holds: (where, fd, family, (id(link), conn id) when in flight).

        where: 'homeless', 'held' (the dispatcher's hold), 'parked', or 'pid=N' (handed over, not yet collected).
        """
        places = [("homeless", fd, family, None) for fd, family in self.dispatcher.homeless]
        if self.dispatcher.holding is not None:
            places += [("held", item.fd, item.family, None) for item in self.dispatcher.holding.items]
        places += [("parked", fd, parked.family, None) for fd, parked in self.parking.parked.items()]
        links = {id(link): link for link in self.dispatcher.links}
        owner = {}
        for w in self.sup.table.values():
            links[id(w.link)] = w.link
            owner[id(w.link)] = w.pid
        for key, link in links.items():
            places += [(f"pid={owner.get(key, '?')}", fd, family, (key, conn_id))
                       for conn_id, (fd, family) in link.unacked.items()]
        return places

    def master_held(self) -> dict[int, list[str]]:
        """inode -> where the master holds a live copy (not one of a hand-off already acked, not yet collected)."""
        held: dict[int, list[str]] = {}
        for where, fd, _family, key in self.master_places():
            try:
                inode = os.fstat(fd).st_ino
            except OSError:
                raise AssertionError(f"the master lists fd {fd} ({where}) but it is closed") from None
            conn = self.conns.get(inode)
            assert conn is not None, f"the master holds inode {inode} ({where}) that was never accepted"
            if key is None or key not in conn.acked:
                held.setdefault(inode, []).append(where)
        return held

    def check_connections(self) -> None:
        """Every connection is in exactly one place: the worker that acked it, a RETURN on that worker's channel,
        or the master (parked, in flight to a worker, homeless or held); or closed by the master (parked and idle
        past the timeout, its client gone, or given back during a stop), and then nowhere."""
        held = self.master_held()
        for inode, where in held.items():
            assert len(where) == 1, f"connection {inode} held twice by the master: {where}"
            conn = self.conns[inode]
            assert conn.served_by is None, \
                f"connection {inode} acked by pid={conn.served_by} is queued again ({where[0]}): " \
                f"{self.fakes[conn.served_by].events}"
            assert conn.returning is None, \
                f"connection {inode} in a RETURN from pid={conn.returning} is also in the master ({where[0]})"
            assert not conn.closed_by_master, \
                f"connection {inode} the master closed ({conn.closed_by_master}) is still in the master ({where[0]})"
        for inode, conn in self.conns.items():
            if conn.served_by is None and conn.returning is None and not conn.closed_by_master:
                assert inode in held, f"connection {inode} was dropped: no worker took it and the master let go"
            owners = [f.pid for f in self.fakes.values() if f.alive and inode in f.conns]
            assert len(owners) <= 1, f"connection {inode} served at once by {owners}"
            assert not owners or (owners == [conn.served_by] and conn.returning is None), \
                f"connection {inode} served by {owners}, the model says {conn.served_by} / RETURN {conn.returning}"

    def check_parking(self) -> None:
        """Parked connections are idle and watched; a resumed one carries its client's address until acked; the
        counters add up: every connection returned was resumed, is parked, expired or ended."""
        lot = self.parking
        # A release (stop, upgrade) counts as resumed; a close at the end, or of one returned during a stop, as
        # expired: the identity the README gives for the metrics holds at all times.
        assert lot.returned == lot.resumed + len(lot.parked) + lot.expired + lot.ended, \
            f"parking counts {lot.returned} returned: {lot.resumed} resumed ({self.released} by releases), " \
            f"{len(lot.parked)} parked, {lot.expired} expired ({self.closed_all} closed at the end, " \
            f"{self.closed_at_stop} returned during the stop), {lot.ended} ended"
        for fd, parked in lot.parked.items():
            conn = self.conns[os.fstat(fd).st_ino]
            assert self.loop._selector.get_map().get(fd) is not None, f"parked fd {fd} is not watched"
            assert parked.since > self.last_tick - lot.idle_timeout, \
                f"parked connection {os.fstat(fd).st_ino} idle since {parked.since}, past --keepalive-timeout " \
                f"({lot.idle_timeout}s) at the tick at {self.last_tick}"
            if self.turns - conn.parked_turn >= 2:
                try:
                    waiting = parked.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
                except BlockingIOError:
                    continue
                except OSError:
                    waiting = b""
                raise AssertionError(f"parked connection {os.fstat(fd).st_ino} has "
                                     f"{'a request' if waiting else 'its end'} waiting, not acted on since "
                                     f"turn {conn.parked_turn} (now {self.turns})")
        watched = self.loop._selector.get_map()
        for where, fd, _family, _key in self.master_places():
            assert where == "parked" or watched.get(fd) is None, f"fd {fd} ({where}) is still watched by the loop"
        resumed = {fd for _where, fd, family, _key in self.master_places() if family & wire.RESUMED}
        stale = set(self.dispatcher.peers) - resumed
        assert not stale, f"the dispatcher keeps client addresses of fds {stale} it no longer hands out"
        unknown = resumed - set(self.dispatcher.peers)
        assert not unknown, f"resumed fds {unknown} go out without their client address"

    def check_no_gap(self) -> None:
        """A worker drained for reload or recycle has a replacement in its slot that already reported READY."""
        for w in self.sup.table.values():
            if w.phase is Phase.DRAINING and w.reason in ("reload", "recycle") and w.pid not in self.gap_checked:
                self.gap_checked.add(w.pid)
                heirs = [f for f in self.fakes.values()
                         if f.slot == w.slot and f.pid > w.pid and f.ever_ready and f.generation >= w.generation]
                assert heirs, f"slot {w.slot} pid={w.pid} drained ({w.reason}) before any replacement was ready: " \
                              f"{[f for f in self.fakes.values() if f.slot == w.slot]}"

    def check_reload_done(self, done: bool) -> None:
        """Where a reload is answered: "done" only once every slot serves the newest generation asked for."""
        sup = self.sup
        if done:
            behind = {slot: (w.generation if w is not None else "empty") for slot, w in enumerate(sup.slots)
                      if w is None or w.generation < sup.generation}
            if behind:
                self.violations.append(f"reload reported done while generation {sup.generation} is wanted and "
                                       f"slots {behind} serve older code: {sup.records()}")
        if self.zygotes is None:
            self.check_answered(done)
        elif self.zygotes.next is None:  # else the reloads asked since are waiting for its import, rightly
            # A --preload reload's answer follows the supervisor's by a callback, which is scheduled only once
            # request_reload() returns when the supervisor answers at once (it is stopping): check after that.
            self.loop.call_soon(self.loop.call_soon, self.check_answered, done)

    def check_answered(self, done: bool) -> None:
        unanswered = [generation for generation, future in self.reloads if not future.done()]
        if unanswered:
            self.violations.append(f"a reload was answered {done} but the requests for generations {unanswered} "
                                   f"were left waiting")

    def check_reloads(self) -> None:
        """Every reload that reports done has every serving slot on at least its generation."""
        for generation, future in self.reloads:
            if future.done() and future.result():
                older = [(w.slot, w.generation) for w in self.sup.slots if w is not None and w.generation < generation]
                assert not older, f"reload to generation {generation} reported done, yet slots serve {older}"

    def check_monotonic(self) -> None:
        """Counters never go backwards."""
        for key in set(self.restarts_seen) | set(self.sup.restarts):  # a key that vanished went back to 0
            value = self.sup.restarts[key]
            assert value >= self.restarts_seen[key], f"restarts{key} went from {self.restarts_seen[key]} to {value}"
        self.restarts_seen = Counter(self.sup.restarts)
        for name, value in (("generation", self.sup.generation), ("failed_generation", self.sup.failed_generation),
                            ("redispatched", self.dispatcher.redispatched)):
            assert value >= self.seen.get(name, value), f"{name} went from {self.seen[name]} to {value}"
            self.seen[name] = value

    def check_counts(self) -> None:
        """Right after a collect, each link's figures are exactly what its worker published."""
        for w in self.sup.table.values():
            if w.pending:
                continue
            fake = self.fakes[w.pid]
            if fake.alive and fake.channel_open and not fake.outbox and not w.link.channel_lost:
                assert w.link.acked_total == fake.acked, \
                    f"pid={w.pid}: master counts {w.link.acked_total} acked, worker acked {fake.acked}"
                assert w.link.open_conns == len(fake.conns), \
                    f"pid={w.pid}: master counts {w.link.open_conns} open, worker has {len(fake.conns)}"

    # ---- the end: faults stop, the pool converges, shutdown ----------------------------------

    def converged(self) -> str:
        """'' when `target` ready workers serve one slot each on the newest code, every fd placed; else why not."""
        # The old code counts as newest while the newest generation could not boot (the reload stopped).
        sup = self.sup
        records = sup.records()
        slots = sorted(w.slot for w in records)
        if slots != list(range(sup.target)):
            return f"slots {slots}, target {sup.target}"
        for w in records:
            if w.phase is not Phase.READY:
                return f"slot {w.slot} pid={w.pid} is {w.phase.value}"
            if w.generation != sup.generation and not (sup.failed_generation == sup.generation
                                                       and w.generation < sup.generation):
                return f"slot {w.slot} runs generation {w.generation}, wanted {sup.generation} " \
                       f"(failed {sup.failed_generation})"
            if w.recycle:
                return f"slot {w.slot} pid={w.pid} asked to be recycled and was not"
            fake = self.fakes[w.pid]
            if not fake.running or fake.state != "ready" or not fake.channel_open:
                return f"slot {w.slot} pid={w.pid} looks ready but is not: {fake}"  # timeouts will tell
        if self.dispatcher.homeless:
            return f"{len(self.dispatcher.homeless)} homeless connections"
        unacked = sum(len(w.link.unacked) for w in records)
        if unacked:
            return f"{unacked} connections not acked"
        zg = self.zygotes
        if zg is not None:
            refused = zg.current.error.startswith("refuses")  # spawned until the next reload, by design
            if zg.current.state != "ready" and not refused:
                return f"the current zygote is {zg.current.state}"
            kept = {z for z in zg.retired if z.generation in {w.generation for w in records}}  # a failed reload's
            extra = [fake for fake in self.zygote_fakes
                     if fake.alive and fake.handle is not zg.current and fake.handle not in kept]
            if extra:
                return f"zygotes other than the current one live on: {extra}"
        return ""

    def converge(self) -> None:
        """Faults stop: every worker behaves (stalls and hangs already there are the supervisor's to clear)."""
        self.auto = True
        self.spawn_failures = 0
        start = self.clock()
        while True:
            self.advance(TICK)
            self.check_table()
            self.check_connections()
            self.check_parking()
            self.check_no_gap()
            why = self.converged()
            if not why:
                break
            assert self.clock() - start < CONVERGE_WITHIN, \
                f"the pool did not converge within {CONVERGE_WITHIN}s once faults stopped: {why}; " \
                f"records {self.sup.records()}; fakes {self.live()}"
        for _ in range(4):  # and it stays there
            self.advance(TICK)
        why = self.converged()
        assert not why, f"the pool left its converged state: {why}"
        for inode, conn in self.conns.items():  # every live worker's channel is read: its RETURNs were acted on
            assert conn.returning is None or not self.fakes[conn.returning].alive, \
                f"connection {inode} given back by pid={conn.returning}, which lives on: the master never took it"
        failed = self.sup.failed_generation
        for generation, future in self.reloads:
            assert future.done(), f"reload to generation {generation} never answered"
            # True once every slot ran it; False only when it (or a later one) failed to boot, or an import failed.
            failed_import = self.import_failures > self.failed_imports_before.get(id(future), self.import_failures)
            assert future.result() or generation <= failed or failed_import, \
                f"reload to generation {generation} answered False, yet no generation from it on failed ({failed})"
        self.check_monotonic()
        assert not self.violations, self.violations

    def shut_down(self) -> None:
        """Master.shutdown with its shutdown tick, the clock moving; every worker process must be gone in time."""
        self.auto = True
        start = self.clock()

        async def master_shutdown():  # Master.shutdown
            self.draining = True
            self.release_parked()  # to the workers before DRAIN reaches them
            await self.sup.shutdown()
            if self.zygotes is not None:
                await self.zygotes.close()
            self.closed_all += len(self.parking.parked)
            self.parking.close_all()
            self.dispatcher.close_homeless()

        task = self.loop.create_task(master_shutdown())
        while True:
            self.pump()
            if task.done():
                break
            assert self.clock() - start <= SHUTDOWN_BOUND + (STOP_GRACE + TICK if self.zygotes else 0), \
                f"shutdown still running after {self.clock() - start:.2f}s: {self.sup.records()} {self.live()}"
            self.check_connections()  # also while the workers drain
            self.check_parking()
            self.clock.advance(TICK)
            self.call(self.sup.tick)
            self.check_no_gap()
            self.call(self.dispatcher.collect_all)
        task.result()
        self.done = True
        assert not self.sup.table, f"records left after shutdown: {self.sup.records()}"
        assert not self.live(), f"workers alive after shutdown: {self.live()}"
        assert not [z for z in self.zygote_fakes if z.alive], f"zygotes alive after shutdown: {self.zygote_fakes}"
        assert not self.dispatcher.homeless
        assert not any(link.unacked for link in self.dispatcher.links)
        assert not self.parking.parked and not self.dispatcher.peers
        self.check_parking()
        for generation, future in self.reloads:
            assert future.done(), f"reload to generation {generation} never answered"
        for inode, conn in self.conns.items():
            if conn.client_closed:
                continue
            try:
                data = conn.client.recv(1)
            except BlockingIOError:
                raise AssertionError(f"connection {inode} still open after shutdown "
                                     f"(served by {conn.served_by})") from None
            except ConnectionResetError:
                data = b""  # closed with its client's next request unread
            assert data == b"", data
        assert not self.violations, self.violations

    def cleanup(self) -> None:
        """Close everything an example opened, whether it passed or not."""
        dispatch.time = self._real_time
        parking_module.time = self._real_parking_time
        for fd in list(self.parking.parked):  # a failed example's
            self.parking._unwatch(fd).sock.close()
        if self.preload:
            zygotes_module.is_subreaper = self._real_is_subreaper
            for z in self.zygotes.zygotes():  # never reaped (a failed example)
                self.loop.remove_reader(z.pidfd)
                os.close(z.pidfd)
                z.close_channel()
        for fake in self.zygote_fakes:
            fake.release()
        logging.getLogger("balancer").removeHandler(self._log_errors)
        held = [fd for fd, _ in self.dispatcher.homeless]
        for w in list(self.sup.table.values()):  # records the supervisor never reaped (a failed example)
            held += [fd for fd, _ in w.link.unacked.values()]
            if not w.pending:
                try:
                    self.loop.remove_reader(w.exit_fd)
                    os.close(w.exit_fd)
                except OSError:
                    pass
            w.channel.close()
        wire.close_all(held)
        for fake in self.fakes.values():
            fake.release()
            if getattr(fake, "exit_r", -1) >= 0 and not getattr(fake, "adopted", False):
                os.close(fake.exit_r)  # forked, never adopted: no record ever held its exit
        for conn in self.conns.values():
            conn.client.close()
        self.loop.close()
