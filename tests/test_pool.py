"""Pure-logic tests of the pool plan: what the supervisor does next for a given table of records."""

from __future__ import annotations

from dataclasses import dataclass

from balancer.process import Phase
from balancer.pool import Wanted, outdated, plan


@dataclass
class Rec:
    slot: int
    phase: Phase = Phase.READY
    generation: int = 0
    recycle: bool = False
    kill_at: float = 0.0


def steps(records, target=2, generation=0, failed=-1, stopping=False, not_before=None, now=100.0):
    out = plan(records, Wanted(target, generation, failed, stopping), not_before or {}, now)
    return ([(r.slot, r.phase.value, reason) for r, reason in out.drain],
            [(r.slot, reason) for r, reason in out.dismiss], out.spawn, out.wait)


def test_a_full_pool_at_the_wanted_generation_needs_nothing():
    assert steps([Rec(0), Rec(1)]) == ([], [], [], {})


def test_empty_slots_are_filled_unless_backing_off():
    assert steps([Rec(1)]) == ([], [], [0], {})
    assert steps([Rec(1)], not_before={0: 101.0}) == ([], [], [], {0: 101.0})
    assert steps([Rec(1)], not_before={0: 99.0}) == ([], [], [0], {})
    assert steps([Rec(0, Phase.BOOTING), Rec(1, Phase.DRAINING)]) == ([], [], [1], {})  # draining serves nobody


def test_reload_replaces_one_slot_at_a_time_and_drains_only_after_ready():
    assert steps([Rec(0), Rec(1)], generation=1) == ([], [], [0], {})  # start slot 0's replacement
    booting = [Rec(0), Rec(0, Phase.BOOTING, 1), Rec(1)]
    assert steps(booting, generation=1) == ([], [], [], {})  # old keeps serving; slot 1 waits its turn
    ready = [Rec(0), Rec(0, generation=1), Rec(1)]
    assert steps(ready, generation=1) == ([(0, "ready", "reload")], [], [1], {})


def test_a_failed_generation_is_not_retried_until_a_newer_reload():
    assert steps([Rec(0), Rec(1)], generation=1, failed=1) == ([], [], [], {})
    assert steps([Rec(0), Rec(1)], generation=2, failed=1) == ([], [], [0], {})


def test_recycle_is_a_replacement_at_the_same_generation():
    assert outdated(Rec(0, recycle=True), Wanted(2, 0, -1))
    ready = [Rec(0, recycle=True), Rec(0), Rec(1)]
    assert steps(ready) == ([(0, "ready", "recycle")], [], [], {})


def test_scale_down_drains_and_dismisses_what_is_past_the_target():
    recs = [Rec(0), Rec(1), Rec(1, Phase.BOOTING, 1), Rec(2, Phase.BOOTING, kill_at=5.0)]
    assert steps(recs, target=1, generation=1) == ([(1, "ready", "scale")], [(1, "scale")], [0], {})


def test_stopping_drains_ready_and_ends_booting_workers_once():
    recs = [Rec(0), Rec(1, Phase.BOOTING), Rec(1, Phase.BOOTING, kill_at=3.0), Rec(0, Phase.DRAINING)]
    assert steps(recs, stopping=True) == ([(0, "ready", "shutdown")], [(1, "shutdown")], [], {})
