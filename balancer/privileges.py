"""--user, --group, --initgroups, --umask, --socket-group: checked at start-up, root dropped once bound."""

from __future__ import annotations

import grp
import logging
import os
import pwd
import subprocess
import sys
from dataclasses import dataclass

from balancer.config import Config, ConfigError, parse_octal

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


def become(run_as: RunAs, paths: list[str]) -> None:
    """Drop to run_as (ConfigError if that fails) and warn about paths it will not be able to remove at exit.

    Nothing the master does later needs root: it signals and reads /proc of its own workers, starts new ones
    on reload, and removes the files it created, which were given to this user.
    """
    try:
        drop(run_as)
    except OSError as exc:
        raise ConfigError(f"cannot switch to user {run_as.name}: {exc.strerror}") from None
    warn_unremovable(run_as, paths)
    log.info("running as user %s (uid %d, gid %d)", run_as.name, run_as.uid, run_as.gid)


def drop(run_as: RunAs) -> None:
    """Become run_as for good (real, effective and saved ids), as the workers started from now on will be."""
    os.setgroups(list(run_as.groups))
    os.setgid(run_as.gid)
    os.setuid(run_as.uid)


def warn_unremovable(run_as: RunAs, paths: list[str]) -> None:
    """Say which files the dropped master will not be able to remove at exit (their directory is root's)."""
    for path in paths:
        directory = os.path.dirname(os.path.abspath(path))
        if not os.access(directory, os.W_OK | os.X_OK):
            log.warning("%s: user %s may not remove it from %s, so it stays after exit (the next start replaces a "
                        "stale socket); give %s a directory it can write", path, run_as.name, directory,
                        run_as.name)
