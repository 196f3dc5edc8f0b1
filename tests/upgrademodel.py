"""The pool model's upgrade step: the supervisor's table crosses a (simulated) exec as the upgrade state's JSON."""

from __future__ import annotations

from balancer import upgrade_state
from balancer.dispatch import Dispatcher
from balancer.supervisor import Supervisor
from balancer.upgrade_adopt import adopt_pool
from balancer.upgrade_capture import capture_pool
from tests import poolmodel
from tests.poolmodel import PoolModel


def upgrade_pool(model: PoolModel) -> bool:
    """SIGUSR2, the pool's part (balancer/upgrade.py): quiesce, hand the table over as the state's JSON, adopt it
    into a new supervisor and dispatcher, as the re-executed image does; False when the upgrade gave up.

    The old objects go as an exec ends them; the fds (channels, boards, exit fds) stay, same numbers.
    """
    old_sup, old_dispatcher = model.sup, model.dispatcher
    for _ in range(6):  # the batch in flight is acked, or the upgrade gives up and nothing changes
        model.call(old_dispatcher.collect_all)
        model.call(old_dispatcher.retry_homeless)
        if not old_dispatcher.homeless and all(not link.unacked and not link.sent for link in old_dispatcher.links):
            break
        model.pump(1)
    else:
        return False
    carried, detail = capture_pool(old_sup)
    state = upgrade_state.decode(upgrade_state.encode(
        {"version": upgrade_state.VERSION, "carried": {"listeners": [], "workers": carried}, "detail": detail}))
    old = dict(old_sup.table)
    if old_sup._wakeup is not None:
        old_sup._wakeup.cancel()
    for w in old.values():  # the exec: the loop's watches, the sockets' objects and the mappings go
        if w.channel.fileno() >= 0:
            model.loop.remove_reader(w.channel.fileno())
            model.loop.remove_writer(w.channel.fileno())
            w.channel.detach()
        model.loop.remove_reader(w.exit_fd)
    gone = [w for pid, w in old.items() if pid not in {item["pid"] for item in carried}]
    assert not gone, f"booting workers at an upgrade: {gone}"
    model.dispatcher = Dispatcher(poolmodel.CAP, on_blocked=model._on_blocked)
    model.sup = model.call(lambda: Supervisor(model.config, model.dispatcher, model._on_capacity, spawn=model._spawn,
                                            clock=model.clock))
    model.sup.on_reload_hooks.append(model.check_reload_done)
    assert model.call(adopt_pool, model.sup, state, lambda pid: old[pid].proc, lambda pid: old[pid].exit_fd)
    for w in model.sup.table.values():
        assert (w.slot, w.generation, w.phase, w.link.acked_total, w.link.dispatched) == (
            old[w.pid].slot, old[w.pid].generation, old[w.pid].phase, old[w.pid].link.acked_total,
            old[w.pid].link.dispatched), f"worker pid={w.pid} changed across the upgrade"
    model.call(model.sup.changed)
    return True
