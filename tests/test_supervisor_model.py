"""Stateful property-based test of the supervisor and dispatcher against scripted fake workers.

Hypothesis generates interleavings of hand-offs, acks, refusals, closes, deaths with and without unread
hand-offs, boot failures and hangs, stalls, external signals, spawn failures, reloads (also during a reload),
scaling (also during a reload), time passing and shutdown, and keep-alive rebalancing: workers giving idle
connections back (also just before a DRAIN or an upgrade), their clients sending the next request or closing
while parked. The master side is the real Supervisor, Dispatcher and Parking on a real asyncio loop (stepped by
hand, its timers on a fake clock); the workers are fakes from tests/fakeworker.py on real SEQPACKET socketpairs
and memfd ack boards. The invariants are the product's promises: one connection, one place (a worker, a RETURN
on its way, the master), one worker at a time; a returned connection comes back RESUMED with its client's
address; no record for a reaped process; the pool converges to its target on the newest code once faults stop;
a rolling reload never drains a worker before its replacement is ready, and says done only once every slot
serves the newest generation asked for; shutdown is bounded by the graceful timeout and leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import socket

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import Phase as HypothesisPhase
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from balancer import wire
from balancer.master import TICK
from balancer.process import Phase
from tests.fakezygote import FakeZygote
from tests.poolmodel import PoolModel
from tests.upgrademodel import upgrade_pool

# A passing run takes about 15 s; a failing one may shrink for up to hypothesis's own 5-minute limit, which
# must end before this one or the minimal failing sequence is never printed.
pytestmark = pytest.mark.timeout(420)

SHUTDOWN_AFTER = 25  # rules before a shutdown may end the run early


def guarded(fn):
    """Mark the machine broken while a step runs, so teardown after a failure only cleans up; count rules."""

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        self.step_ok = False
        self.steps += fn.__name__ != "promises"
        result = fn(self, *args, **kwargs)
        self.step_ok = True
        return result

    return wrapper


class SupervisorModel(PoolModel, RuleBasedStateMachine):
    """The master's supervisor and dispatcher, real, against scripted fake workers."""

    def __init__(self) -> None:
        self.step_ok = True  # False while a step runs: a teardown after a failure only cleans up
        self.steps = 0
        super().__init__()

    # ---- rules --------------------------------------------------------------------------------

    @rule(sizes=st.lists(st.integers(1, 3), min_size=1, max_size=5))
    @precondition(lambda self: not self.done)
    @guarded
    def accept(self, sizes):
        """Connections arrive; the master accepts what the ready workers have room for, batch by batch."""
        self.arrive(sizes)
        self.pump()

    @rule(i=st.integers(0, 15), verdicts=st.lists(st.sampled_from(["ack", "refuse"]), max_size=4),
          then=st.sampled_from(["live", "crash", "crash", "exit"]))
    @precondition(lambda self: not self.done)
    @guarded
    def work(self, i, verdicts, then):
        """A worker acks or refuses (out of fds) some hand-offs, then lives on, crashes or exits on its own."""
        # A crash loses what it did not read with its channel: the master sees ECONNRESET before its REFUSEs.
        fake = self.pick(i, lambda f: f.running and f.state != "booting")
        if fake is None:
            return
        fake.read(verdicts)
        if then == "crash":
            fake.die(-11)
        elif then == "exit":
            fake.finish()
        self.pump()

    @rule(outcomes=st.lists(st.sampled_from(["ready", "ready", "error", "die", "hang"]), min_size=1, max_size=3))
    @precondition(lambda self: not self.done)
    @guarded
    def boot(self, outcomes):
        """Booting workers load the backend: ready, a boot error (exit 3), a crash at import, or a hang."""
        for fake, outcome in zip(self.live(lambda f: f.running and f.state == "booting" and not f.boot_hang),
                                 outcomes):
            if outcome == "ready":
                fake.ready()
            elif outcome == "error":
                fake.boot_error()
            elif outcome == "die":
                fake.die(-11)
            else:
                fake.boot_hang = True
        self.pump()

    @rule(i=st.integers(0, 15))
    @precondition(lambda self: not self.done)
    @guarded
    def crash(self, i):
        """Any worker dies (kill -9, OOM), booting, stalled or not, with whatever it has not read."""
        fake = self.pick(i)
        if fake is not None:
            fake.die(-9)
        self.pump()

    @rule(i=st.integers(0, 15), what=st.sampled_from(["close_conns", "blocked", "stopped", "resume", "sigterm",
                                                      "recycle", "lose_channel", "garbage", "spawns_fail"]))
    @precondition(lambda self: not self.done)
    @guarded
    def misbehave(self, i, what):
        """One of the smaller faults and events below happens to a worker (or to the next spawns)."""
        # close_conns: its clients leave; blocked: its loop hangs; stopped: SIGSTOP; resume: both end; sigterm:
        # someone else's SIGTERM; recycle: --max-requests reached; lose_channel: its channel end closes while
        # it lives; garbage: a message the master cannot parse; spawns_fail: EMFILE on the next spawns.
        fake = self.pick(i)
        if what == "spawns_fail":
            self.spawn_failures = 1 + i % 3
        elif fake is None:
            pass
        elif what == "close_conns" and fake.running:
            fake.close_conns(1 + i % 3)
        elif what in ("blocked", "stopped") and fake.running:
            fake.stalled = what
        elif what == "resume":
            fake.stalled = ""
        elif what == "sigterm":
            fake.signals.append(signal.SIGTERM)
        elif what == "recycle" and fake.state == "ready":
            fake.recycle = True
        elif what == "lose_channel" and fake.running and fake.state != "booting":
            fake.close_channel()
        elif what == "garbage" and fake.running:
            fake.send(b"\xff")
        self.pump()

    @rule(i=st.integers(0, 15), count=st.integers(1, 3), now=st.booleans(),
          then=st.sampled_from(["idle", "idle", "request", "close"]))
    @precondition(lambda self: not self.done)
    @guarded
    def give_back(self, i, count, now, then):
        """A worker gives idle keep-alive connections back to the master (workers/rebalance.py): at once, or at its
        next loop turn, before it reads what waits on its channel (a hand-off, a DRAIN); then their clients wait,
        send their next request or close, maybe before the master has read the RETURN."""
        fake = self.pick(i, lambda f: f.running and f.state == "ready" and f.conns)
        if fake is None:
            return
        given = list(fake.conns)[:count]
        if now:
            given = given[:fake.give_back(count)]
        else:
            fake.give_back_next = count
        for inode in given if then != "idle" else []:
            conn = self.conns[inode]
            try:
                if then == "request":
                    conn.client.send(b"GET /next HTTP/1.1\r\n\r\n")
                    conn.sent += 1
                else:
                    conn.client.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        self.pump()

    @rule(i=st.integers(0, 63), parked=st.booleans(),
          what=st.sampled_from(["request", "request", "request", "close", "half-close"]))
    @precondition(lambda self: not self.done and self.conns)
    @guarded
    def client(self, i, parked, what):
        """A client sends its next request on a connection (a parked one goes out again, RESUMED), or closes it
        (a parked one is closed and counted ended)."""
        conns = [c for c in self.conns.values() if not c.client_closed]
        if parked:
            watched = {os.fstat(fd).st_ino for fd in self.parking.parked}
            conns = [c for inode, c in self.conns.items() if inode in watched and not c.client_closed] or conns
        if not conns:
            return
        conn = conns[i % len(conns)]
        try:
            if what == "request":
                conn.client.send(b"GET /next HTTP/1.1\r\n\r\n")
                conn.sent += 1
            elif what == "half-close":
                conn.client.shutdown(socket.SHUT_WR)
            else:
                conn.client.close()
                conn.client_closed = True
        except OSError:
            pass  # its server end is gone, or the buffer is full
        self.pump()

    @rule(dt=st.sampled_from([0.05, TICK, 1.0, 2.0]), boots=st.booleans(),
          arrivals=st.lists(st.integers(1, 3), max_size=3))
    @precondition(lambda self: not self.done)
    @guarded
    def time_passes(self, dt, boots, arrivals):
        """Running workers read their channels and beat, booting ones may finish, the master ticks."""
        # Connections arriving afterwards wait unread in the channels, as those that come between loop turns.
        if boots:
            for fake in self.live(lambda f: f.running and f.state == "booting" and not f.boot_hang):
                fake.ready()
        self.advance(dt)
        self.arrive(arrivals)
        self.pump()

    @rule()
    @precondition(lambda self: not self.done)
    @guarded
    def reload(self):
        """SIGHUP (also during a reload)."""
        self.ask_reload()
        self.pump()

    @rule(n=st.integers(1, 3))
    @precondition(lambda self: not self.done)
    @guarded
    def scale(self, n):
        """SIGTTIN/SIGTTOU or `balancer scale N` (also during a reload)."""
        self.call(self.sup.scale, n)
        self.pump()

    @rule()
    @precondition(lambda self: not self.done and not self.preload and not self.sup._reload_waiters
                  and not any(w.phase is Phase.BOOTING for w in self.sup.table.values()))
    @guarded
    def upgrade(self):
        """SIGUSR2 or `balancer upgrade` (refused while a worker boots, and under --preload, as the real master
        refuses it): the table crosses an exec as JSON. Parked connections go to the workers at every turn of the
        quiesce, none across the exec; the new image parks what is given back after it."""
        self.release_parked()
        self.upgrading = True
        try:
            upgraded = upgrade_pool(self)
        finally:
            self.upgrading = False
        if upgraded:
            assert not self.parking.parked, "parked connections crossed the exec"
            self.parking.peers = self.dispatcher.peers  # the new image's dispatcher (one Parking: its counters go on)
            self.sup.on_return = self._on_return
        self.pump()

    @rule()
    @precondition(lambda self: not self.done and self.steps >= SHUTDOWN_AFTER)
    @guarded
    def shutdown(self):
        """SIGTERM to the master, faults and all: it must end within the graceful timeout plus a small bound."""
        self.shut_down()

    @rule()
    @precondition(lambda self: self.done)
    def finished(self):
        """After shutdown nothing more happens (hypothesis needs some rule to be enabled)."""

    # ---- invariants ---------------------------------------------------------------------------

    @invariant()
    @guarded
    def promises(self):
        """The promises that hold after every step (the end phase checks convergence and shutdown)."""
        assert not self.violations, self.violations
        if self.done:
            return
        self.check_table()
        self.check_connections()
        self.check_parking()
        self.check_no_gap()
        self.check_reloads()
        self.check_monotonic()
        self.check_zygotes()

    def teardown(self) -> None:
        """Faults stop: the pool must converge, then shut down in time; always close what the example opened."""
        try:
            if self.step_ok and not self.done:
                self.converge()
                self.shut_down()
        finally:
            self.cleanup()


def run_model(machine_class, examples: int) -> None:
    """Run a state machine; no example database: a failure prints its reproduce_failure blob instead of leaving
    state in the tree. BALANCER_MODEL_SHRINK=0 reports the first failing sequence unshrunk (quick checks against
    mutations)."""
    phases = tuple(settings.default.phases)
    if os.environ.get("BALANCER_MODEL_SHRINK") == "0":
        phases = tuple(p for p in phases if p is not HypothesisPhase.shrink)
    run_state_machine_as_test(machine_class, settings=settings(
        max_examples=examples, stateful_step_count=50, deadline=None, database=None, print_blob=True, phases=phases,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))


def test_supervisor_keeps_its_promises_under_faults():
    run_model(SupervisorModel, 300)


class PreloadModel(SupervisorModel):
    """The same, with --preload: the real Zygotes forks every worker through fake zygotes, which fail too."""

    preload = True

    def zygote(self, i: int) -> FakeZygote | None:
        alive = [z for z in self.zygote_fakes if z.alive]
        return alive[i % len(alive)] if alive else None

    @rule(outcome=st.sampled_from(["ready", "ready", "error", "die", "hang"]))
    @precondition(lambda self: not self.done)
    @guarded
    def zygote_imports(self, outcome):
        """The importing zygote (boot, reload or restart) finishes: ready, the code does not import, a crash, a hang."""
        for z in self.zygote_fakes:
            if z.alive and z.state == "importing":
                z.imported(outcome)
        self.pump()

    @rule(i=st.integers(0, 7), what=st.sampled_from(["die", "die", "stop", "stop", "resume", "refuse", "fail_next",
                                                     "die_before_handoff"]))
    @precondition(lambda self: not self.done)
    @guarded
    def zygote_fault(self, i, what):
        """A zygote dies (kill -9, OOM), hangs (SIGSTOP) or resumes, refuses to fork, fails a fork, or dies between
        answering a fork and handing the request to its worker."""
        z = self.zygote(i)
        if z is None:
            return
        if what == "die":
            z.die(-signal.SIGKILL)
        elif what == "stop":
            z.stopped = True
        elif what == "resume":
            z.stopped = False
        elif what == "refuse":
            z.refuse = True
        elif what == "fail_next":
            z.fail_next += 1
        else:
            z.die_before_handoff = True
        self.pump()


def test_preload_keeps_its_promises_under_zygote_faults():
    run_model(PreloadModel, 200)  # zygote faults among the worker faults; a run takes about as long as the above


@contextlib.contextmanager
def model(machine_class=None):
    """A fresh model for a replayed sequence; its end phase (convergence, shutdown) runs unless a step failed."""
    machine = (machine_class or SupervisorModel)()
    try:
        yield machine
    except BaseException:
        machine.step_ok = False  # clean up only: the failure is the report
        raise
    finally:
        machine.teardown()


def test_a_refusal_queued_behind_econnreset_is_read_before_eviction():
    """A worker acks a hand-off, refuses the next and dies with a third unread: no connection is served twice."""
    # The master must read the REFUSE behind ECONNRESET, or it re-dispatches what the dead worker acked.
    with model() as m:
        first = None
        for sizes in ([1], [2], [2], [2], [2], [2]):  # a free worker first: batches alternate between the workers
            m.accept(sizes=sizes)
            m.promises()
            first = m.pick(0)
            if len(m.sup.table[first.pid].link.sent) >= 3:
                break
        assert len(m.sup.table[first.pid].link.sent) >= 3, "the case needs three hand-offs queued to one worker"
        m.work(i=0, verdicts=["ack", "refuse"], then="crash")
        m.promises()
        assert m.dispatcher.redispatched >= 2  # the refused hand-off and the unread one went elsewhere


def test_a_reload_drains_no_worker_before_its_replacement_is_ready():
    """A worker is drained only once its replacement reported READY, also when a reload is asked during one."""
    with model() as m:
        m.reload()
        m.promises()
        m.time_passes(dt=TICK, boots=False, arrivals=[1])  # the replacement is still booting
        m.promises()
        m.reload()
        m.promises()
        m.time_passes(dt=TICK, boots=True, arrivals=[2])
        m.promises()
        assert m.gap_checked, "no worker was drained for the reload"


def test_a_reload_asked_while_the_last_replacement_boots_is_done_only_on_the_newest_code():
    """SIGHUP, slot 0 replaced, SIGHUP while slot 1's replacement boots: "done" waits for generation 2 everywhere."""
    with model() as m:
        m.reload()
        m.boot(outcomes=["ready"])  # slot 0 runs generation 1; slot 1's replacement starts booting
        m.promises()
        assert [w.generation for w in m.sup.slots] == [1, 0]
        m.reload()
        m.boot(outcomes=["ready"])  # slot 1 runs generation 1: every slot has the first ask, none the second
        m.promises()
        assert [w.generation for w in m.sup.slots] == [1, 1]
        assert not any(future.done() for _, future in m.reloads), "reported done before generation 2 serves"
        for _ in range(2):
            m.time_passes(dt=TICK, boots=True, arrivals=[])
        m.promises()
        assert [w.generation for w in m.sup.slots] == [2, 2]
        assert all(future.done() and future.result() for _, future in m.reloads)


def test_preload_a_hung_zygote_is_killed_and_the_workers_asked_of_it_are_spawned():
    """A worker dies while its zygote is SIGSTOPped: FORK_TIMEOUT later the zygote is killed, the worker spawned."""
    with model(PreloadModel) as m:
        hung = m.zygote(0)
        hung.stopped = True
        m.crash(i=1)
        m.time_passes(dt=TICK, boots=True, arrivals=[])  # the slot's back-off (0.1 s) is over: a fork is asked
        asked = [w for w in m.sup.records() if w.pending]
        assert len(asked) == 1, m.sup.records()
        m.time_passes(dt=0.5, boots=True, arrivals=[])
        assert asked[0] in m.sup.records() and hung.alive, "given up on before FORK_TIMEOUT"
        m.time_passes(dt=0.6, boots=True, arrivals=[])
        m.promises()
        assert not hung.alive and asked[0] not in m.sup.records() and m.zygotes.spawned == 1
        m.time_passes(dt=0.05, boots=True, arrivals=[])
        assert m.sup.serving(asked[0].slot) is not None
        m.time_passes(dt=TICK, boots=True, arrivals=[])  # its back-off (0.1 s): a new zygote imports
        m.zygote_imports(outcome="ready")
        assert m.zygotes.current is not hung.handle and m.zygotes.current.state == "ready", "not restarted"


def test_preload_a_reload_whose_code_does_not_import_touches_no_worker():
    """SIGHUP, and the new zygote's import fails: the reload answers False, and the pool is as it was."""
    with model(PreloadModel) as m:
        before = {w.pid: (w.phase, w.generation) for w in m.sup.records()}
        m.reload()
        m.time_passes(dt=TICK, boots=True, arrivals=[1])
        m.zygote_imports(outcome="error")
        m.promises()
        assert {w.pid: (w.phase, w.generation) for w in m.sup.records()} == before
        (_, answer), = m.reloads
        assert answer.done() and answer.result() is False and m.zygotes.reload_error
        assert m.sup.generation == 0 and m.zygotes.current.generation == 0


def test_preload_a_reload_during_an_import_drops_it_and_the_old_zygote_goes_with_its_generation():
    """SIGHUP twice while the first new zygote imports: only the second forks; then the first zygote exits."""
    with model(PreloadModel) as m:
        old = m.zygote(0)
        m.reload()
        first = m.zygote_fakes[-1]
        m.reload()
        m.promises()
        assert not first.alive, "the dropped import's zygote lives on"
        m.zygote_imports(outcome="ready")
        for _ in range(8):
            m.time_passes(dt=TICK, boots=True, arrivals=[1])
        m.promises()
        assert [w.generation for w in m.sup.slots] == [1, 1] and not old.alive
        assert all(answer.result() for _, answer in m.reloads)


def test_preload_a_zygote_dying_between_answering_a_fork_and_handing_it_over_leaves_no_phantom():
    """The zygote said the worker's pid, then died before handing it its channel: that worker is tracked, exits
    with the zygote, and its slot is filled again (spawned, while the zygote is down)."""
    with model(PreloadModel) as m:
        z = m.zygote(0)
        z.die_before_handoff = True
        m.crash(i=1)
        m.time_passes(dt=TICK, boots=False, arrivals=[])  # the fork is asked once the slot's back-off is over
        m.promises()
        assert not z.alive and all(f.pid in m.sup.table for f in m.live())
        for _ in range(4):
            m.time_passes(dt=TICK, boots=True, arrivals=[])
        m.promises()
        assert m.zygotes.spawned == 1 and all(w is not None for w in m.sup.slots)
def test_a_worker_whose_loop_blocks_after_an_upgrade_still_times_out():
    """Found by the upgrade rule: adopted records took their heartbeat time from another clock than the
    supervisor's, so a worker blocked after the upgrade never reached --timeout and the pool never converged."""
    with model() as m:
        m.upgrade()
        m.promises()
        m.misbehave(i=0, what="blocked")
        m.promises()


def test_a_worker_whose_channel_ended_before_an_upgrade_gets_nothing_after_it():
    """Found by the upgrade rule: a live worker whose channel had ended was adopted as sendable, and the next
    hand-off went to a closed socket."""
    with model() as m:
        m.misbehave(i=0, what="lose_channel")
        m.promises()
        m.upgrade()
        m.promises()
        m.accept(sizes=[1])
        m.promises()


def served_now(m, inode: int) -> None:
    """Every running worker reads its channel (acking what it was handed); the master's loop turns."""
    for fake in m.live(lambda f: f.running and f.state == "ready"):
        fake.read()
    m.pump()


def test_a_returned_connection_whose_client_sends_is_served_again_resumed_with_its_client():
    """A worker gives a connection back, its client sends the next request: the master hands it out once, flagged
    RESUMED with the address the RETURN carried, and one worker serves it; its peers entry goes with the ack."""
    with model() as m:
        m.accept(sizes=[2])
        served_now(m, 0)
        fake = m.pick(0, lambda f: f.conns)
        inode = next(iter(fake.conns))
        assert fake.give_back(1) == 1
        m.pump()
        assert m.conns[inode].served_by is None and len(m.parking.parked) == 1
        m.promises()
        m.conns[inode].client.send(b"GET /next HTTP/1.1\r\n\r\n")
        m.pump()
        assert not m.parking.parked and (m.parking.returned, m.parking.resumed) == (1, 1)
        m.promises()
        served_now(m, inode)
        server = m.fakes[m.conns[inode].served_by]
        assert server.last_handoff[inode][0] == socket.AF_UNIX | wire.RESUMED
        assert server.last_handoff[inode][1] == m.conns[inode].peer
        m.time_passes(dt=TICK, boots=False, arrivals=[])  # the tick collects the ack
        m.promises()
        assert not m.dispatcher.peers


def test_a_connection_given_back_just_before_the_drain_is_closed_and_one_parked_is_served_first():
    """One connection parked, another given back at the worker's next turn, which comes after the stop began: the
    parked one is handed out before the DRAIN (and acked), the late one is closed by the draining master."""
    with model() as m:
        m.accept(sizes=[3])
        served_now(m, 0)
        fake = m.pick(0, lambda f: len(f.conns) >= 2)
        parked, late = list(fake.conns)[:2]
        assert fake.give_back(1) == 1
        m.pump()
        fake.give_back_next = 1
        m.shut_down()
        assert m.released == 1 and m.closed_at_stop == 1
        assert m.conns[parked].served_by is not None and m.conns[late].closed_by_master == "returned during a stop"


def test_a_parked_connection_idle_past_the_keepalive_timeout_is_closed_by_the_tick():
    """Parked and silent: the master's tick closes it once --keepalive-timeout has passed, not before."""
    with model() as m:
        m.accept(sizes=[1])
        served_now(m, 0)
        fake = m.pick(0, lambda f: f.conns)
        inode = next(iter(fake.conns))
        assert fake.give_back(1) == 1
        m.pump()
        for _ in range(2):
            m.time_passes(dt=2.0, boots=False, arrivals=[])
        assert m.parking.parked and m.parking.expired == 0
        m.promises()
        m.time_passes(dt=2.0, boots=False, arrivals=[])
        assert not m.parking.parked and m.parking.expired == 1
        assert m.conns[inode].client.recv(1) == b""
        m.promises()
