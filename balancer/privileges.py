"""--user, --group, --initgroups, --umask, --socket-group: checked at start-up, root dropped once bound."""

from __future__ import annotations

import grp
import logging
import os
import pwd
import signal
import subprocess
import sys
from dataclasses import dataclass

from balancer.config import Config, ConfigError, parse_octal
from balancer.logs import log_files, open_log_fd
from balancer.sources import flag_of

log = logging.getLogger("balancer")

PROBE_TIMEOUT = 60  # seconds for the interpreter probe: one import of the worker runtime


@dataclass(frozen=True)
class RunAs:
    """Who the master becomes once bound, and who its workers are from the start."""

    uid: int
    gid: int
    groups: tuple[int, ...]  # supplementary groups: --user's (with its primary) with --initgroups, else none
    name: str  # for messages

    @property
    def owner(self) -> tuple[int, int]:
        """(uid, gid) for the files the master creates as root on this user's behalf."""
        return self.uid, self.gid


def lookup_group(text: str, option: str) -> int:
    """A gid from a group name or number; ConfigError for a name the group database does not know."""
    if text.isdigit():
        return int(text)
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise ConfigError(f"bad {option} {text!r}: no such group") from None


def lookup_user(text: str) -> tuple[int, str, int | None]:
    """(uid, name, primary gid) from a user name or number; a number without a passwd entry has no gid."""
    try:
        entry = pwd.getpwuid(int(text)) if text.isdigit() else pwd.getpwnam(text)
    except KeyError:
        if text.isdigit():
            return int(text), text, None
        raise ConfigError(f"bad --user {text!r}: no such user") from None
    return entry.pw_uid, entry.pw_name, entry.pw_gid


def resolve(config: Config) -> RunAs | None:
    """Who to run as, or None to stay who we are; ConfigError for an unknown name or a switch we cannot make."""
    if not config.user and not config.group:
        if config.initgroups:
            raise ConfigError("--initgroups needs --user: it gives the workers that user's groups")
        return None
    if config.user:
        uid, name, primary = lookup_user(config.user)
    else:
        uid, name, primary = os.getuid(), pwd.getpwuid(os.getuid()).pw_name, os.getgid()
    gid = lookup_group(config.group, "--group") if config.group else primary
    if gid is None:
        raise ConfigError(f"--user {config.user} has no passwd entry to take a group from: pass --group")
    if config.initgroups:
        if not config.user or name == str(uid):
            raise ConfigError("--initgroups needs --user naming a user of the passwd database")
        groups = tuple(sorted(set(os.getgrouplist(name, gid))))
    else:
        groups = ()
    if os.geteuid() != 0:
        if (uid, gid) == (os.getuid(), os.getgid()) and not config.initgroups:
            return None  # already that user: nothing to drop
        raise ConfigError(f"--user/--group: switching to {name} (uid {uid}, gid {gid}) needs root; "
                          f"running as uid {os.geteuid()}")
    return RunAs(uid, gid, groups, name)


def socket_owner(config: Config, run_as: RunAs | None) -> tuple[int, int]:
    """(uid, gid) to give unix-socket binds, -1 where unchanged: --user's so it can remove them, --socket-group's."""
    uid = run_as.uid if run_as is not None else -1
    gid = lookup_group(config.socket_group, "--socket-group") if config.socket_group else -1
    return uid, gid


def apply_umask(config: Config) -> None:
    """--umask for the master and, inherited, its workers: before anything is created."""
    mask = parse_octal(config.umask, "--umask")
    if mask is not None:
        os.umask(mask)


def probe_interpreter(run_as: RunAs, env: dict) -> None:
    """Fail now, in one line, if run_as cannot start a worker: Python under a 0700 /root is the usual cause.

    Run before anything is bound or created: a worker that cannot even exec would otherwise be retried
    with backoff forever, the master serving nothing.
    """
    cmd = [sys.executable, "-c", "import balancer_workers.worker"]
    try:
        done = subprocess.run(cmd, user=run_as.uid, group=run_as.gid, extra_groups=list(run_as.groups), env=env,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=PROBE_TIMEOUT)
    except OSError as exc:
        raise ConfigError(f"--user {run_as.name} cannot run {sys.executable}: {exc.strerror}; install Python "
                          f"where {run_as.name} can read and run it") from None
    except subprocess.TimeoutExpired:
        raise ConfigError(f"--user {run_as.name}: importing the worker runtime took over {PROBE_TIMEOUT}s") from None
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit code {done.returncode}"]
        raise ConfigError(f"--user {run_as.name} cannot import the worker runtime: {lines[-1]}")


def prepare(config: Config) -> RunAs | None:
    """Apply --umask; who to become once bound (--user/--group), checked to be able to start a worker."""
    from balancer.process import worker_env

    apply_umask(config)
    run_as = resolve(config)
    if run_as is not None:
        probe_interpreter(run_as, worker_env())
    return run_as


def become(run_as: RunAs, config: Config) -> None:
    """Drop to run_as (ConfigError if that fails, or if the user cannot read a file its workers must load).

    Nothing the master does later needs root: it signals and reads /proc of its own workers, starts new ones
    on reload, and removes the files it created, which were given to this user (a janitor removes those in
    directories the user may not write).
    """
    try:
        drop(run_as)
    except OSError as exc:
        raise ConfigError(f"cannot switch to user {run_as.name}: {exc.strerror}") from None
    check_readable(run_as, config)
    check_log_files(run_as, config)
    log.info("running as user %s (uid %d, gid %d)", run_as.name, run_as.uid, run_as.gid)


def check_readable(run_as: RunAs, config: Config) -> None:
    """As the user now: the TLS files its workers load must be readable, or start-up stops here (exit 2).

    Root read them when the options were checked; a worker failing on one would make it look like a broken
    backend (exit 3).
    """
    for name in ("certfile", "keyfile", "ca_certs"):
        path = getattr(config, name)
        if path:
            try:
                with open(path, "rb"):
                    pass
            except OSError as exc:
                raise ConfigError(f"{flag_of(name)} {path}: user {run_as.name} cannot read it: "
                                  f"{exc.strerror}") from None


def check_log_files(run_as: RunAs, config: Config) -> None:
    """As the user now: each log file must open as its workers will open it, or start-up stops here (exit 2).

    The master gave the user the files it created, and only those (balancer/logs.py): one that was there
    before may be another file hard-linked in, and keeps its owner.
    """
    for option, path in log_files(config):
        try:
            if option == "--log-config":  # the standard library's handler, as the workers will make it
                open(path, "a").close()
            else:
                os.close(open_log_fd(path))
        except OSError as exc:
            raise ConfigError(f"{option} {path}: user {run_as.name} cannot write it: {exc.strerror}; balancer "
                              f"gives {run_as.name} only the log files it creates: chown this one or remove it"
                              ) from None


def drop(run_as: RunAs) -> None:
    """Become run_as for good (real, effective and saved ids), as the workers started from now on will be."""
    os.setgroups(list(run_as.groups))
    os.setgid(run_as.gid)
    os.setuid(run_as.uid)


def unremovable(run_as: RunAs, paths: list[str]) -> list[str]:
    """The paths in a directory run_as may not write: once root is dropped, the master cannot remove them."""
    out = []
    for path in paths:
        directory = os.path.dirname(os.path.abspath(path))
        st = os.stat(directory)
        if st.st_uid == run_as.uid:
            writable = st.st_mode & 0o300 == 0o300
        elif st.st_gid in (run_as.gid, *run_as.groups):
            writable = st.st_mode & 0o030 == 0o030
        else:
            writable = st.st_mode & 0o003 == 0o003
        if not writable:
            out.append(path)
    return out


def start_janitor(paths: list[tuple[str, tuple[int, int] | None]]) -> tuple[int, int]:
    """Fork a process that keeps root only to remove paths once the master is gone; (its pid, the master's end).

    It owns nothing else (every other fd closed, every signal but SIGKILL blocked) and waits for end-of-file on
    a pipe whose write end only the master holds, so the master's exit, clean or kill -9, is what starts it;
    it removes each path only if it is still the file the master created (same device and inode).
    """
    from balancer.listeners import unlink_if_ours  # imported before the fork: the child imports nothing

    read_end, write_end = os.pipe()  # close-on-exec: no worker inherits the master's end
    titled = sys.modules.get("setproctitle")  # already loaded if the master set its own title
    # Blocked across the fork: the master's Python handlers must never run in the janitor.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    pid = os.fork()
    if pid != 0:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    else:  # the janitor
        try:
            if titled is not None:
                titled.setproctitle("balancer: janitor")
            os.closerange(0, read_end)
            os.closerange(read_end + 1, os.sysconf("SC_OPEN_MAX"))
            while True:
                try:
                    if not os.read(read_end, 1):
                        break
                except InterruptedError:
                    continue
            for path, identity in paths:
                unlink_if_ours(path, identity)
        finally:
            os._exit(0)
    os.close(read_end)
    return pid, write_end


def stop_janitor(janitor: tuple[int, int] | None) -> None:
    """The master is ending: let the janitor remove its files, and wait for it (it has nothing else to do)."""
    if janitor is None:
        return
    pid, write_end = janitor
    os.close(write_end)
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass
