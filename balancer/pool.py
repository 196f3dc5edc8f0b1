"""What the pool should do next: a pure function from the table of worker records to the steps toward the wanted pool."""

from __future__ import annotations

from dataclasses import dataclass, field

from balancer.process import Phase


@dataclass(frozen=True)
class Wanted:
    """The pool the supervisor moves toward."""

    target: int  # slots 0..target-1 each served by a ready worker
    generation: int  # the code generation every slot should run
    failed_generation: int  # a generation whose replacement could not boot: not tried again until asked
    stopping: bool = False


@dataclass
class Plan:
    """Steps for the supervisor to take now, in this order: drain, dismiss, spawn."""

    drain: list = field(default_factory=list)  # (record, reason): ready workers to drain
    dismiss: list = field(default_factory=list)  # (record, reason): booting workers to end; they never served
    spawn: list = field(default_factory=list)  # slots to start a worker for
    wait: dict = field(default_factory=dict)  # slot -> time its back-off ends: start one then


def outdated(w, wanted: Wanted) -> bool:
    """True when w should be replaced: older code than wanted (unless that reload failed), or asked to recycle."""
    return w.recycle or (w.generation < wanted.generation and wanted.generation != wanted.failed_generation)


def plan(records: list, wanted: Wanted, not_before: dict[int, float], now: float) -> Plan:
    """The steps that move `records` (every live worker, oldest first within a slot) one step toward `wanted`.

    A replacement's predecessor drains only once the replacement is ready; one slot is replaced at a time, so
    the others keep serving meanwhile; an empty slot is filled at once unless its back-off says wait.
    """
    out = Plan()
    if wanted.stopping:
        _retire(records, "shutdown", out)
        return out
    by_slot: dict[int, list] = {}
    for w in records:
        by_slot.setdefault(w.slot, []).append(w)
    replacing = _drain_replaced(by_slot, wanted.target, out)
    for slot, recs in by_slot.items():
        if slot >= wanted.target:
            _retire(recs, "scale", out)
    _fill(by_slot, wanted, replacing, not_before, now, out)
    return out


def _retire(records, reason: str, out: Plan) -> None:
    """Every worker of records goes: the ready ones drain, the booting ones (not yet told) are dismissed."""
    for w in records:
        if w.phase is Phase.READY:
            out.drain.append((w, reason))
        elif w.phase is Phase.BOOTING and not w.kill_at:
            out.dismiss.append((w, reason))


def _drain_replaced(by_slot: dict[int, list], target: int, out: Plan) -> bool:
    """Drain each wanted slot's ready workers but its newest; True while some slot's replacement still boots."""
    replacing = False
    for slot, recs in by_slot.items():
        if slot >= target:
            continue
        ready = [w for w in recs if w.phase is Phase.READY]
        for old in ready[:-1]:  # a replacement is ready: only now may its predecessor drain
            out.drain.append((old, "reload" if old.generation < ready[-1].generation else "recycle"))
        if ready and any(w.phase is Phase.BOOTING for w in recs):
            replacing = True
    return replacing


def _fill(by_slot: dict[int, list], wanted: Wanted, replacing: bool, not_before: dict[int, float], now: float,
          out: Plan) -> None:
    """Start a worker for every empty wanted slot, and a replacement for the first outdated one unless one boots."""
    candidates = []
    for slot in range(wanted.target):
        recs = by_slot.get(slot, ())
        if any(w.phase is Phase.BOOTING for w in recs):
            continue
        ready = [w for w in recs if w.phase is Phase.READY]
        if not ready:
            _start(out, slot, not_before, now)
        elif outdated(ready[-1], wanted):
            candidates.append(slot)
    if candidates and not replacing:
        _start(out, candidates[0], not_before, now)


def _start(out: Plan, slot: int, not_before: dict[int, float], now: float) -> None:
    """Spawn for slot now, or when its back-off ends."""
    at = not_before.get(slot, 0.0)
    if now < at:
        out.wait[slot] = at
    else:
        out.spawn.append(slot)
