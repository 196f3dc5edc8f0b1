"""Files the master opens by path (--pid-file, --error-logfile, --access-logfile) where another user can plant one.

The exploit of issue 24: a directory owned by the service user (nobody), in which that user symlinks the pid
file's name to a root-only file; root starts `balancer --user nobody --pid-file` there. The master must never
write through such a link, open a FIFO or a device, or give away a file it did not create itself.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest

from tests.harness import SERVING, Balancer, pid_alive
from tests.test_sockets_privileges import python_for_others  # noqa: F401 (fixture)

pytestmark = pytest.mark.timeout(90)
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="plants files as another user and drops to it: needs root")
BACKEND = ("--workers", "1", "--backend", "whoisapp:whois")
FLAGS = ("--pid-file", "--error-logfile", "--access-logfile")
SECRET = b"root's secret\n"


@pytest.fixture
def planted():
    """(a directory nobody owns, as /var/log/app given to a service user; a root-only 0600 file out of its reach)."""
    base = tempfile.mkdtemp(prefix="balancer-planted-")
    os.chmod(base, 0o755)
    user = pwd.getpwnam("nobody")
    theirs = os.path.join(base, "nobodys")
    os.mkdir(theirs, 0o755)
    os.chown(theirs, user.pw_uid, user.pw_gid)
    private = os.path.join(base, "root-only")
    os.mkdir(private, 0o700)
    victim = os.path.join(private, "secret")
    with open(victim, "wb") as f:
        f.write(SECRET)
    os.chmod(victim, 0o600)
    try:
        yield theirs, victim
    finally:
        shutil.rmtree(base, ignore_errors=True)


def as_nobody(*cmd: str) -> None:
    """Run cmd as nobody: what the service user itself could do."""
    subprocess.run(["runuser", "-u", "nobody", "--", *cmd], check=True, timeout=30)


def untouched(victim: str) -> bool:
    """The victim still is root's 0600 file with its own content."""
    st = os.stat(victim)
    with open(victim, "rb") as f:
        return (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), f.read()) == (0, 0, 0o600, SECRET)


def start_expecting_refusal(*args: str) -> Balancer:
    """Start the real CLI and wait (bounded) for it to exit; a master still running after 20 s is stopped."""
    b = Balancer(*args, ready=False)
    try:
        b.wait(20)
    except subprocess.TimeoutExpired:
        b.stop()
    return b


def one_error_line(b: Balancer) -> str:
    """The one line a refused start prints, after checking it exited 2 and printed nothing else."""
    assert b.proc.returncode == 2, b.log()
    assert len(b.lines) == 1 and b.lines[0].startswith("balancer: error: "), b.log()
    return b.lines[0]


@as_root
@pytest.mark.parametrize("flag", FLAGS)
def test_a_symlink_planted_by_the_user_is_refused_and_its_target_untouched(planted, python_for_others, flag):
    theirs, victim = planted
    path = os.path.join(theirs, "app.pid" if flag == "--pid-file" else "app.log")
    as_nobody("ln", "-s", victim, path)
    b = start_expecting_refusal("--user", "nobody", flag, path, *BACKEND)
    line = one_error_line(b)
    assert path in line and "symbolic link" in line, line
    assert untouched(victim)
    assert os.path.islink(path)  # left as it was: not ours to remove


@as_root
@pytest.mark.parametrize("flag", FLAGS)
def test_a_fifo_or_a_device_is_refused_at_once(planted, flag):
    theirs, _ = planted
    path = os.path.join(theirs, "app.fifo")
    as_nobody("mkfifo", path)  # opening it to write would block until someone reads
    for target in (path, "/dev/null"):
        b = start_expecting_refusal(flag, target, *BACKEND)
        line = one_error_line(b)
        assert target in line and "not a regular file" in line, line
    assert stat.S_ISFIFO(os.lstat(path).st_mode)


@as_root
def test_with_user_a_log_file_that_was_there_is_never_given_away(planted, python_for_others):
    # The master cannot tell a file it finds from another one hard-linked there: only files it creates are
    # given to --user. One the user cannot write stops the start, in one line naming what to do.
    theirs, _ = planted
    errors = os.path.join(theirs, "error.log")
    with open(errors, "w") as f:
        f.write("an older root-owned log\n")
    os.chmod(errors, 0o644)
    b = start_expecting_refusal("--user", "nobody", "--error-logfile", errors, *BACKEND)
    line = one_error_line(b)
    assert f"--error-logfile {errors}: user nobody cannot write it" in line, line
    assert os.stat(errors).st_uid == 0


@as_root
def test_with_user_the_files_the_master_creates_in_a_root_directory_are_the_users(python_for_others, tmp_path):
    # /var/log/app owned by root: the master creates the files as root and gives them to the user, so its
    # workers (and the master after SIGUSR1) write them as that user.
    logs = tempfile.mkdtemp(prefix="balancer-rootlogs-")
    os.chmod(logs, 0o755)
    nobody = pwd.getpwnam("nobody")
    try:
        files = {flag: os.path.join(logs, name) for flag, name in
                 (("--pid-file", "app.pid"), ("--error-logfile", "error.log"), ("--access-logfile", "access.log"))}
        with Balancer("--user", "nobody", *(item for pair in files.items() for item in pair), *BACKEND,
                      ready=False) as b:
            wait_for_text(files["--error-logfile"], "workers serving on")
            for path in files.values():
                st = os.lstat(path)
                assert stat.S_ISREG(st.st_mode) and st.st_uid == nobody.pw_uid, path
            with open(files["--pid-file"]) as f:
                assert f.read() == f"{b.pid}\n"
            assert stat.S_IMODE(os.stat(files["--pid-file"]).st_mode) == 0o644
            b.signal(signal.SIGTERM)
            assert b.wait(30) == 0, b.log()
    finally:
        shutil.rmtree(logs, ignore_errors=True)


@as_root
def test_with_user_a_log_config_file_is_given_to_it_only_if_the_master_created_it(python_for_others):
    logs = tempfile.mkdtemp(prefix="balancer-rootlogs-")
    os.chmod(logs, 0o755)
    try:
        app_log, config = os.path.join(logs, "app.log"), os.path.join(logs, "logging.json")
        with open(config, "w") as f:
            json.dump({"handlers": {"file": {"class": "logging.FileHandler", "filename": app_log}},
                       "root": {"level": "INFO", "handlers": ["file"]}}, f)
        with Balancer("--user", "nobody", "--log-config", config, "--workers", "1", "--backend",
                      "testapp:create_app", ready=False) as b:
            wait_for_text(app_log, "workers serving on")
            assert os.stat(app_log).st_uid == pwd.getpwnam("nobody").pw_uid
            with open(app_log) as f:
                address = SERVING.search(f.read()).group(1)
            with pytest.raises(urllib.error.HTTPError):
                urllib.request.urlopen(f"http://{address}/crash", timeout=10)
            wait_for_text(app_log, "Error handling request")  # the worker's line: it opened the file as nobody
            b.signal(signal.SIGTERM)
            assert b.wait(30) == 0, b.log()
        os.chown(app_log, 0, 0)  # there before the next start: not the master's to give away
        b = start_expecting_refusal("--user", "nobody", "--log-config", config, *BACKEND)
        line = one_error_line(b)
        assert f"--log-config {app_log}: user nobody cannot write it: Permission denied" in line, line
        assert os.stat(app_log).st_uid == 0
    finally:
        shutil.rmtree(logs, ignore_errors=True)


def test_dev_stdout_and_dev_stderr_are_the_streams_not_files_opened_through_a_link():
    # /dev/stdout is a symlink (to /proc/self/fd/1), which no log file is opened through: the name means
    # the process's own stream, as "-" does.
    with Balancer("--access-logfile", "/dev/stdout", "--error-logfile", "/dev/stderr", *BACKEND) as b:
        mark = b.mark()
        with urllib.request.urlopen(f"{b.url}/via-dev-stdout", timeout=10) as resp:
            assert resp.status == 200
        b.wait_for(r'"GET /via-dev-stdout HTTP/1.1" 200 ', 10, start=mark)


@as_root
def test_sigusr1_reopens_no_symlink_planted_after_a_rotation(planted):
    # Without --user the master and its workers stay root; the log directory is the service user's. After
    # logrotate moves the files away, that user plants links in their place before SIGUSR1 comes.
    theirs, victim = planted
    errors, access = os.path.join(theirs, "error.log"), os.path.join(theirs, "access.log")
    with Balancer("--error-logfile", errors, "--access-logfile", access, *BACKEND, ready=False) as b:
        wait_for_text(errors, "workers serving on")
        worker = b.worker_pids()[0]
        for path in (errors, access):
            os.rename(path, path + ".1")
            as_nobody("ln", "-s", victim, path)
        b.signal(signal.SIGUSR1)
        wait_for_text(errors + ".1", "SIGUSR1: reopening log files failed")  # the old file goes on
        b.wait_for(r"balancer worker: reopening log files failed", 20)
        assert untouched(victim)
        for pid in (b.pid, worker):
            assert victim not in [os.path.realpath(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        assert pid_alive(worker)


def wait_for_text(path: str, text: str, timeout: float = 30) -> None:
    """Poll a file until it contains text."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(path) as f:
                if text in f.read():
                    return
        except FileNotFoundError:
            pass
        assert time.monotonic() < deadline, f"{text!r} not in {path} in {timeout}s"
        time.sleep(0.05)


# ---- the pid file: another live master's is not taken over ------------------------------------------------

def test_a_pid_file_naming_a_live_master_stops_a_second_one(tmp_path):
    pid_file = str(tmp_path / "app.pid")
    with Balancer("--pid-file", pid_file, *BACKEND) as first:
        second = start_expecting_refusal("--pid-file", pid_file, *BACKEND)
        line = one_error_line(second)
        assert f"pid file {pid_file} names a running balancer master (pid {first.pid})" in line, line
        with open(pid_file) as f:
            assert f.read() == f"{first.pid}\n"
        first.signal(signal.SIGTERM)
        assert first.wait(30) == 0, first.log()
    assert not os.path.exists(pid_file)


def test_a_stale_pid_file_is_replaced_and_a_successors_is_left_at_stop(tmp_path):
    pid_file = tmp_path / "app.pid"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for stale in (f"{dead.pid}\n", "garbage", f"{os.getpid()}\n"):  # gone, unreadable, alive but not a master
        pid_file.write_text(stale)
        with Balancer("--pid-file", str(pid_file), *BACKEND) as b:
            assert pid_file.read_text() == f"{b.pid}\n"
            b.signal(signal.SIGTERM)
            assert b.wait(30) == 0, b.log()
        assert not pid_file.exists()
    with Balancer("--pid-file", str(pid_file), *BACKEND) as b:
        successor = tmp_path / "successor"
        successor.write_text("12345\n")
        os.rename(successor, pid_file)  # another master's now, written as this one writes its own
        b.signal(signal.SIGTERM)
        assert b.wait(30) == 0, b.log()
    assert pid_file.read_text() == "12345\n"
    assert os.listdir(tmp_path) == ["app.pid"]  # no temporary file left behind
