"""Upgrading the master in place (SIGUSR2, `balancer upgrade`): preflight, quiesce, execve itself, adopt.

The master owns every listener, worker channel and ack board as an fd, so it can re-exec its own pid with
them: its workers stay its children (waitpid and pidfds stay exact), the kernel backlog holds new connections
for the few milliseconds accepting is paused, and the counters continue from the state it hands itself
(balancer/upgrade_state.py). A preflight child imports the new code and parses the configuration first: when
that fails, nothing changes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

from balancer import upgrade_bridge, upgrade_state
from balancer.listeners import Listener
from balancer.process import Phase
from balancer.signals import HANDLED_SIGNALS
from balancer.upgrade_adopt import adopt_pool
from balancer.upgrade_capture import capture, cpu_seconds, notify_env, survivors

log = logging.getLogger("balancer")

QUIESCE_TIMEOUT = 1.0  # seconds to wait for the acks of the batch in flight before giving the upgrade up
PREFLIGHT_TIMEOUT = 60.0  # seconds the preflight child has to import the new code and parse the options
# The interpreter the master re-execs (default: its own): for tests, a path whose exec fails.
EXECUTABLE_ENV = "BALANCER_UPGRADE_EXECUTABLE"


class Upgrader:
    """The master's upgrade: refuses, runs the preflight, quiesces, execs; and, in the new image, adopts."""

    def __init__(self, master) -> None:
        self.master = master
        self.upgrades = 0  # balancer_master_upgrades_total: execs of this master since it started
        self.exec_started = time.time()  # balancer_master_start_time_seconds: this image's exec
        self.children: set[int] = set()  # preflight children and carried workers not yet in the table
        self.running: asyncio.Future | None = None
        self.state: dict | None = None  # what the previous image handed over, until adopted
        self.metrics_bases: dict | None = None  # the exited workers' counters, for the metrics endpoint once it runs
        self.paused_ms = 0.0  # how long the upgrade that started this image kept accepting paused
        self.exec_ms = 0.0  # how long from the quiesce to accepting again in this image (the bridge accepted meanwhile)
        self.exec_cpu_ms = 0.0  # and the CPU time this process spent meanwhile (exec, imports, adoption)
        self.bridged = 0  # connections the bridge accepted meanwhile (balancer/upgrade_bridge.py)
        self.bridge: dict | None = None  # the previous image's bridge: its pid and control socket's fd

    # ---- the new image --------------------------------------------------------------------------

    def take(self) -> dict | None:
        """The state the previous image left in $BALANCER_UPGRADE_STATE, or None at a plain start."""
        state = upgrade_state.take_from_environ()
        if state is None:
            return None
        self.state = state
        log.debug("upgrade: new image reading its state %.1f ms (%.1f ms of CPU) after accepting paused",
                  (time.monotonic() - state.get("paused_at", time.monotonic())) * 1000,
                  (cpu_seconds() - state.get("paused_cpu", cpu_seconds())) * 1000)
        self.children.update(w["pid"] for w in state["carried"]["workers"])
        self.bridge = state["carried"].get("bridge")
        if self.bridge is not None:
            self.children.add(self.bridge["pid"])  # ours to reap once it reported, not the orphan reaper's
        return state

    def adopt_listeners(self) -> list[Listener]:
        """The listening sockets the previous image had, same fds, nothing bound again."""
        out = []
        for item in self.state["carried"]["listeners"]:
            sock = socket.socket(item["family"], socket.SOCK_STREAM, 0, item["fd"])
            os.set_inheritable(item["fd"], False)
            identity = tuple(item["identity"]) if item.get("identity") else None
            out.append(Listener(sock, item["label"], item.get("unlink", ""), identity, item.get("systemd_fd")))
        return out

    def carried_service(self, name: str) -> tuple[socket.socket, dict] | None:
        """The control socket or metrics endpoint the previous image listened on (once), with what it kept."""
        if self.state is None:
            return None
        item = self.state["carried"].get("services", {}).pop(name, None)
        if item is None:
            return None
        os.set_inheritable(item["fd"], False)
        return socket.socket(item["family"], socket.SOCK_STREAM, 0, item["fd"]), item

    def adopt_pool(self) -> None:
        """Put the previous image's workers in the table and continue its counters; a foreign state rolls them."""
        master, state = self.master, self.state
        if adopt_pool(master.supervisor, state):
            self._continue_counters(state["detail"])
            self.metrics_bases = state["detail"].get("metrics")
        else:
            log.warning("upgrade: state version %s from the previous image, this one reads %d: listeners "
                        "adopted, its %d workers rolled as the previous generation", state.get("version"),
                        upgrade_state.VERSION, len(state["carried"]["workers"]))
        report = None
        if self.bridge is not None:  # stopped only now: it accepted while this image built its table
            control = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, 0, self.bridge["fd"])
            report, self.bridged = self.stop_bridge(self.bridge["pid"], control)  # on top of the carried counters
            self.bridge = None
        self.children.clear()
        master.booted = True
        master.supervisor.changed()
        now = time.monotonic()
        paused_at = state.get("paused_at", now)
        self.paused_ms = upgrade_bridge.paused_seconds(report, paused_at, now) * 1000
        self.exec_ms = (now - paused_at) * 1000
        # CPU time goes on across execve: what the exec cost this process, whatever else the machine runs.
        self.exec_cpu_ms = (cpu_seconds() - state["paused_cpu"]) * 1000 if "paused_cpu" in state else 0.0

    def stop_bridge(self, pid: int, control: socket.socket) -> tuple[dict | None, int]:
        """Stop the bridge; its hand-offs in flight and counters into the links: (its report, connections it took)."""
        master = self.master
        report, fds, why = upgrade_bridge.stop(pid, control)
        self.children.discard(pid)
        if report is None:
            log.warning("upgrade: %s; its hand-offs are taken as acknowledged", why)
            return None, 0
        links = {w.pid: w.link for w in master.supervisor.records()}
        accepted = upgrade_bridge.take_back(report, fds, master.dispatcher, links)
        master.accepted += accepted
        for name, count in report["accept_errors"].items():
            master.accept_errors[name] = master.accept_errors.get(name, 0) + count
        return report, accepted

    def _continue_counters(self, detail: dict) -> None:
        """The previous image's counters, so that no counter goes back across the exec."""
        master = self.master
        m = detail["master"]
        master.accepted, master.accept_errors = m["accepted"], m["accept_errors"]
        master.paused_seconds, master.coalesced, master.started = m["paused_seconds"], m["coalesced"], m["started"]
        master.reaper.reaped = m["reaped"]
        master.reopen_pending.update(m["reopen_pending"])
        self.upgrades = m["upgrades"]
        for sig in m["signals"]:  # asked for while the previous image was upgrading: acted on now
            master.signals.put_nowait(sig)

    def resumed(self) -> None:
        """Accepting again in the new image: say how long it was paused; answer a waiting `balancer upgrade`."""
        state, self.state = self.state, None
        metrics = next((svc for svc in self.master.services if hasattr(svc, "bases")), None)
        if metrics is not None and self.metrics_bases:
            from balancer.upgrade_metrics import load_bases

            load_bases(metrics, self.metrics_bases)
        self.metrics_bases = None
        paused_ms = self.paused_ms
        self.upgrades += 1
        log.info("upgrade: master re-executed in place (pid %d, upgrade %d); accepting paused %.1f ms; the exec "
                 "took %.1f ms (%.1f ms of CPU), %d connections handed out meanwhile", os.getpid(), self.upgrades,
                 paused_ms, self.exec_ms, self.exec_cpu_ms, self.bridged)
        for fd in state["carried"].get("replies", ()):
            reply = {"ok": True, "pid": os.getpid(), "upgrades": self.upgrades, "paused_ms": round(paused_ms, 1),
                     "exec_ms": round(self.exec_ms, 1), "exec_cpu_ms": round(self.exec_cpu_ms, 1),
                     "bridged": self.bridged}
            try:
                os.write(fd, json.dumps(reply).encode() + b"\n")
            except OSError:
                pass  # the client gave up waiting
            finally:
                os.close(fd)

    # ---- the old image --------------------------------------------------------------------------

    def refusal(self) -> str:
        """Why the master cannot upgrade now ('' when it can)."""
        master = self.master
        if master.zygotes is not None:
            return "not with --preload: its zygotes cannot be carried across the exec yet; restart the service"
        if master.run_as is not None:
            return "not with --user: the re-executed master could not become that user again; restart the service"
        if not master.booted or master.stopping or master.supervisor is None:
            return "the master is starting or stopping"
        sup = master.supervisor
        if sup._reload_waiters or any(w.phase is Phase.BOOTING for w in sup.table.values()):
            return "a worker is booting (reload, respawn or scale under way): try again once it is ready"
        if self.running is not None and not self.running.done():
            return "an upgrade is under way already"
        return ""

    def start(self, reply: socket.socket | None = None, on_checked=None) -> asyncio.Future:
        """Begin an upgrade; the future ends with the one line saying why it did not happen.

        It never ends in this image when the upgrade succeeds: the exec replaces it (the new image answers reply).
        on_checked is called once the preflight passed, before anything else happens.
        """
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        why = self.refusal()
        if why:
            log.warning("upgrade refused: %s", why)
            future.set_result(why)
            return future
        self.running = asyncio.ensure_future(self._upgrade(reply, on_checked))
        self.running.add_done_callback(lambda task: future.set_result(
            task.result() if not task.cancelled() else "cancelled"))
        return future

    async def _upgrade(self, reply: socket.socket | None, on_checked) -> str:
        """Preflight, quiesce, exec; the reason it failed (the old image serves on)."""
        try:
            return await self._try_upgrade(reply, on_checked)
        except Exception as exc:  # out of fds, processes or memory on the way: nothing was handed over
            log.exception("upgrade failed, the old image serves on")
            self.master.notifier.ready(self.master.serving_status())
            self.master._on_capacity()
            return f"{type(exc).__name__}: {exc}"

    async def _try_upgrade(self, reply: socket.socket | None, on_checked) -> str:
        """_upgrade's steps; an exception means nothing was handed over."""
        master = self.master
        log.info("upgrade: checking the new code and configuration in a child process")
        why = await self.preflight()
        if not why and (master.stopping or self.refusal_after_preflight()):
            why = "the master began stopping or reloading meanwhile"
        if why:
            log.error("upgrade failed, nothing changed: %s", why)
            return why
        if on_checked is not None:
            on_checked()
        master.notifier.reloading("upgrading the master in place")
        paused_at = time.monotonic()
        quiet = await self.quiesce()
        # The loop kept acting on signals meanwhile: a stop or a reload that began wins over the upgrade.
        if not quiet or master.stopping or self.refusal_after_preflight():
            master._on_capacity()
            why = (f"the workers did not acknowledge the connections in flight within {QUIESCE_TIMEOUT:g}s"
                   if not quiet else "the master began stopping or reloading meanwhile")
            log.error("upgrade failed, nothing changed: %s", why)
            master.notifier.ready(master.serving_status())
            return why
        why = self.exec_new_image(paused_at, reply)
        log.error("upgrade failed, the old image serves on: %s", why)
        master.notifier.ready(master.serving_status())
        master._on_capacity()
        return why

    def refusal_after_preflight(self) -> bool:
        """True when the pool changed shape during the preflight (a reload, a respawn)."""
        sup = self.master.supervisor
        return bool(sup._reload_waiters) or any(w.phase is Phase.BOOTING for w in sup.table.values())

    async def preflight(self) -> str:
        """Run `python -m balancer.upgrade_check ARGV` in a child; '' when the new code imports and the options parse."""
        import tempfile  # here: the new image has no use for it before it accepts again

        cmd = [sys.executable, "-m", "balancer.upgrade_check", *sys.argv[1:]]
        loop = asyncio.get_running_loop()
        with tempfile.TemporaryFile() as errors:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors)
            self.children.add(proc.pid)  # the orphan reaper must leave its exit status to us
            try:
                pidfd = os.pidfd_open(proc.pid)
                exited = loop.create_future()
                loop.add_reader(pidfd, lambda: exited.done() or exited.set_result(None))
                try:
                    await asyncio.wait_for(exited, PREFLIGHT_TIMEOUT)
                except asyncio.TimeoutError:
                    proc.kill()
                    return f"the preflight took longer than {PREFLIGHT_TIMEOUT:g}s"
                finally:
                    loop.remove_reader(pidfd)
                    os.close(pidfd)
                code = proc.wait()
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                self.children.discard(proc.pid)
            errors.seek(0)
            lines = errors.read().decode(errors="replace").strip().splitlines()
        if code == 0:
            return ""
        return f"the new code or configuration fails: {lines[-1] if lines else f'exit code {code}'}"

    async def quiesce(self) -> bool:
        """Stop accepting; wait until every fd handed out is acked and none waits for a worker (True)."""
        master = self.master
        dispatcher = master.dispatcher
        deadline = time.monotonic() + QUIESCE_TIMEOUT
        while True:
            # Parked keep-alive connections go to the workers, not across the exec (those given back after the
            # last turn wait in the channels); before the pause, which places whatever the hold keeps.
            if master.parking is not None:
                master.parking.release_all()
            # Again at every turn: a worker's READY, or the tick, resumes accepting when there is room.
            master._pause()
            for name in ("_coalesce_timer", "_capacity_poll"):
                timer = getattr(master, name)
                if timer is not None:
                    timer.cancel()
                    setattr(master, name, None)
            dispatcher.collect_all()
            dispatcher.retry_homeless()
            held = dispatcher.holding is not None and dispatcher.holding.items
            if not held and not dispatcher.homeless and all(not link.unacked and not link.sent for link in dispatcher.links):
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.001)

    def exec_new_image(self, paused_at: float, reply: socket.socket | None) -> str:
        """Hand the state over and execve; returns only if the exec failed (why), with everything as it was."""
        master = self.master
        pending = []
        while not master.signals.empty():
            pending.append(master.signals.get_nowait())
        reply_fd = os.dup(reply.fileno()) if reply is not None else -1
        state = capture(master, self, paused_at, pending, [reply_fd] if reply_fd >= 0 else [])
        bridge = self.start_bridge()
        if bridge is not None:
            state["carried"]["bridge"] = {"pid": bridge[0], "fd": bridge[1].fileno()}
        fds = survivors(state)
        state_fd = upgrade_state.write_memfd(upgrade_state.encode(state))
        env = dict(os.environ, **{upgrade_state.ENV: str(state_fd)}, **notify_env(master.notifier))
        executable = os.environ.get(EXECUTABLE_ENV) or sys.executable
        for fd in fds:
            os.set_inheritable(fd, True)
        # Held across the exec: the new image's loop receives them once it handles them (balancer/launch.py).
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
        for handler in logging.getLogger().handlers + log.handlers:
            handler.flush()
        try:
            os.execve(executable, sys.orig_argv, env)
        except OSError as exc:
            why = f"exec {executable}: {exc.strerror}"
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
        for fd in fds:
            os.set_inheritable(fd, False)
        os.close(state_fd)
        if reply_fd >= 0:
            os.close(reply_fd)
        for sig in pending:
            master.signals.put_nowait(sig)
        if bridge is not None:  # the old image takes back what the bridge did
            self.stop_bridge(*bridge)
        return why

    def start_bridge(self) -> tuple[int, socket.socket] | None:
        """Fork the bridge that accepts while the exec runs; None when no process could be made (none then)."""
        try:
            bridge = upgrade_bridge.start(self.master)
        except OSError as exc:
            log.warning("upgrade: no bridge (%s): connections wait in the backlog during the exec", exc)
            return None
        self.children.add(bridge[0])  # ours to reap once it reported, not the orphan reaper's
        return bridge
