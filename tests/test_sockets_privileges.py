"""Unix socket mode and group, --umask, and the drop from root to --user, with real users made for the test."""

from __future__ import annotations

import errno
import grp
import json
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request

import pytest

from tests.harness import HERE, Balancer, pid_alive

pytestmark = [pytest.mark.timeout(90),
              pytest.mark.skipif(os.geteuid() != 0, reason="creates users and groups and binds a port below 1024: "
                                                         "needs root")]
TAG = f"b16{os.getpid() % 100000}"  # names of the users and group this run creates (and removes)
BACKEND = ("--backend", "whoisapp:whois")


def run(*cmd: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=check)


@pytest.fixture(scope="module")
def accounts():
    """A group, a user in it and a user outside it; removed afterwards."""
    group, member, outsider = f"{TAG}g", f"{TAG}m", f"{TAG}o"
    made = []
    try:
        run("groupadd", "--system", group)
        made.append(("groupdel", group))
        for user, extra in ((member, ["-G", group]), (outsider, [])):
            run("useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", *extra, user)
            made.insert(0, ("userdel", user))
        yield {"group": group, "gid": grp.getgrnam(group).gr_gid, "member": member, "outsider": outsider,
               "member_uid": pwd.getpwnam(member).pw_uid, "member_gid": pwd.getpwnam(member).pw_gid}
    finally:
        for cmd in made:
            run(*cmd, check=False)


@pytest.fixture
def python_for_others():
    """Let other users run this interpreter: give o+x to the directories on its path that lack it (a 0700
    /root), and take it back afterwards. balancer itself refuses to start when --user cannot (tested below)."""
    changed = []
    paths = {os.path.realpath(sys.executable), sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"],
             str(HERE.parent)}
    try:
        for path in paths:
            directory = os.path.dirname(path)
            while directory not in ("/", ""):
                mode = stat.S_IMODE(os.stat(directory).st_mode)
                if not mode & 0o001 and directory not in (d for d, _ in changed):
                    os.chmod(directory, mode | 0o001)
                    changed.append((directory, mode))
                directory = os.path.dirname(directory)
        yield
    finally:
        for directory, mode in reversed(changed):
            os.chmod(directory, mode)


@pytest.fixture
def shared_dir(accounts):
    """A directory under /tmp that the test users can enter (pytest's tmp_path is 0700 root)."""
    path = tempfile.mkdtemp(prefix=f"{TAG}-")
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def curl_unix_as(user: str, path: str) -> subprocess.CompletedProcess:
    """curl over the unix socket as user: (exit code, body); 7 is curl's 'could not connect'."""
    return run("runuser", "-u", user, "--", "curl", "-sS", "--max-time", "10", "--unix-socket", path,
               "http://sock/who", check=False)


def connect_errno_as(user: str, path: str) -> int:
    """The errno of connecting to path as user (0: connected), from a forked child that became user."""
    entry = pwd.getpwnam(user)
    groups = os.getgrouplist(user, entry.pw_gid)
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # only syscalls here, then _exit: the parent has threads
        code = 255
        try:
            os.setgroups(groups)
            os.setgid(entry.pw_gid)
            os.setuid(entry.pw_uid)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                code = sock.connect_ex(path)
        finally:
            os.write(write_end, bytes([code]))
            os._exit(0)
    os.close(write_end)
    try:
        return os.read(read_end, 1)[0]
    finally:
        os.close(read_end)
        os.waitpid(child, 0)


def umask_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)


def ids_of(pid: int) -> tuple[list[int], list[int], list[int]]:
    """(uids, gids, supplementary groups) of pid from /proc: real, effective, saved, fs for the first two."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = [int(v) for v in value.split()] if key in ("Uid", "Gid", "Groups") else None
    return fields["Uid"], fields["Gid"], fields["Groups"]


def free_low_port() -> int:
    """A free port below 1024 on 127.0.0.1 (only root may bind one)."""
    for port in range(81, 100):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    pytest.fail("no free port between 81 and 99")


def test_unix_socket_mode_and_group_decide_who_connects(accounts, shared_dir):
    path = os.path.join(shared_dir, "app.sock")
    with Balancer("--workers", "1", "--bind", f"unix:{path}", "--socket-mode", "0660", "--socket-group",
                  accounts["group"], "--umask", "027", *BACKEND) as b:
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
        assert (st.st_uid, st.st_gid) == (0, accounts["gid"])
        allowed = curl_unix_as(accounts["member"], path)
        assert allowed.returncode == 0, allowed.stderr
        assert json.loads(allowed.stdout)["remote"] == ""  # a unix peer has no address
        assert connect_errno_as(accounts["member"], path) == 0
        assert connect_errno_as(accounts["outsider"], path) == errno.EACCES
        assert curl_unix_as(accounts["outsider"], path).returncode == 7  # curl: could not connect
        # --umask reaches the master and, inherited, its workers.
        assert {umask_of(pid) for pid in [b.pid, *b.worker_pids()]} == {0o027}
    assert not os.path.exists(path)


def test_default_socket_mode_follows_the_umask(shared_dir):
    path = os.path.join(shared_dir, "default.sock")
    with Balancer("--workers", "1", "--bind", f"unix:{path}", "--umask", "007", *BACKEND):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o770


def test_master_and_workers_drop_to_user_after_binding_a_low_port(accounts, python_for_others, shared_dir):
    user, uid, gid = accounts["member"], accounts["member_uid"], accounts["member_gid"]
    os.chown(shared_dir, uid, gid)  # where the dropped master may create and remove its files
    port = free_low_port()
    ctl, pid_file = os.path.join(shared_dir, "ctl.sock"), os.path.join(shared_dir, "master.pid")
    unix = os.path.join(shared_dir, "app.sock")
    with Balancer("--workers", "2", "--user", user, "--initgroups", "--bind", f"127.0.0.1:{port}",
                  "--bind", f"unix:{unix}", "--control-socket", ctl, "--pid-file", pid_file, *BACKEND) as b:
        assert b.wait_for(r"running as user (\S+)").group(1) == user
        # Served on the port below 1024 by a worker running as the user, with its groups (--initgroups).
        served = run("curl", "-sS", "--max-time", "10", f"http://127.0.0.1:{port}/low")
        seen = json.loads(served.stdout)
        assert (seen["uid"], seen["gid"]) == (uid, gid) and accounts["gid"] in seen["groups"]
        for pid in [b.pid, *b.worker_pids()]:
            uids, gids, groups = ids_of(pid)
            assert set(uids) == {uid} and set(gids) == {gid}, (pid, uids, gids)  # real, effective, saved, fs
            assert 0 not in groups and accounts["gid"] in groups
        # The master's own process metrics still read /proc/self, which setuid() would have made root's.
        with urllib.request.urlopen(f"http://{b.metrics_address}/metrics", timeout=10) as resp:
            assert re.search(r"^process_open_fds \d", resp.read().decode(), re.M)
        # Its files are the user's: `balancer status` as the user works.
        for path in (ctl, pid_file, unix):
            assert os.lstat(path).st_uid == uid, path
        status = run("runuser", "-u", user, "--", sys.executable, "-m", "balancer", "status", "--json",
                     "--control-socket", ctl, check=False)
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["pid"] == b.pid
        # A reload: the master, no longer root, starts new workers, which are the user too.
        old = set(b.worker_pids())
        b.signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while old & set(b.worker_pids()) or len(b.worker_pids()) != 2:
            assert time.monotonic() < deadline, b.log()
            time.sleep(0.05)
        for pid in b.worker_pids():
            assert set(ids_of(pid)[0]) == {uid}
        assert json.loads(run("curl", "-sS", "--max-time", "10", f"http://127.0.0.1:{port}/")
                          .stdout)["uid"] == uid
        workers = [b.pid, *b.worker_pids()]
        b.signal(signal.SIGTERM)
        assert b.wait(30) == 0, b.log()
    assert os.listdir(shared_dir) == []  # control socket, pid file and unix socket all removed by the user
    assert not any(pid_alive(pid) for pid in workers)


def test_the_control_server_of_a_master_run_as_user_refuses_a_client_of_another_uid(accounts, python_for_others,
                                                                                   shared_dir):
    """The server's own SO_PEERCRED check: root reaches the user's socket (no file mode stops root) and is refused."""
    user, uid, gid = accounts["member"], accounts["member_uid"], accounts["member_gid"]
    os.chown(shared_dir, uid, gid)
    ctl = os.path.join(shared_dir, "ctl.sock")
    with Balancer("--workers", "1", "--user", user, "--control-socket", ctl, *BACKEND) as b:
        b.wait_for(r"running as user")
        mark = b.mark()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:  # not the client: it refuses such a master
            sock.settimeout(10)
            sock.connect(ctl)
            try:
                sock.sendall(b'{"cmd": "scale", "n": 3}\n')
            except BrokenPipeError:  # refused and closed before the request went: the refusal is there to read
                pass
            reply = json.loads(sock.makefile("rb").readline())
        assert reply == {"ok": False, "error": "permission denied"}, reply
        assert os.getuid() != uid
        # The user itself is answered, and the refused scale never happened.
        status = run("runuser", "-u", user, "--", sys.executable, "-m", "balancer", "status", "--json",
                     "--control-socket", ctl, check=False)
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["target"] == 1
        assert "scaling" not in "\n".join(b.lines[mark:]), b.log()


def test_bad_user_or_group_is_one_line_exit_2_with_nothing_left(shared_dir):
    pid_file = os.path.join(shared_dir, "master.pid")
    for args, text in ((("--user", f"{TAG}-nobody"), "no such user"),
                       (("--user", "root", "--group", f"{TAG}-nogroup"), "no such group"),
                       (("--socket-group", f"{TAG}-nogroup", "--bind", f"unix:{shared_dir}/s.sock"), "no such group"),
                       (("--socket-mode", "0999"), "octal")):
        done = run(sys.executable, "-m", "balancer", "--bind", "127.0.0.1:0", "--metrics-bind", "none",
                   "--pid-file", pid_file, *args, check=False)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and text in lines[0], done.stderr
    assert os.listdir(shared_dir) == []


def test_user_who_cannot_run_the_interpreter_is_refused_at_start(accounts, shared_dir):
    # Without python_for_others, a 0700 /root keeps the user from the interpreter: found before binding.
    exe = os.path.realpath(sys.executable)
    if not any(not stat.S_IMODE(os.stat(d).st_mode) & 0o001 for d in _ancestors(exe)):
        pytest.skip("every user may run this interpreter here")
    done = run(sys.executable, "-m", "balancer", "--bind", f"unix:{shared_dir}/s.sock", "--metrics-bind", "none",
               "--user", accounts["member"], check=False)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "cannot run" in done.stderr and os.listdir(shared_dir) == []


def _ancestors(path: str) -> list[str]:
    out = []
    while (path := os.path.dirname(path)) not in ("/", ""):
        out.append(path)
    return out


def test_files_the_user_may_not_remove_are_removed_by_the_janitor(accounts, python_for_others, shared_dir):
    """A pid file, control socket and unix socket in a root directory: gone after a stop, a failed start and
    a kill -9 of the master, though the master runs as a user who may not write there."""
    user = accounts["member"]
    files = {"--pid-file": os.path.join(shared_dir, "master.pid"),
             "--control-socket": os.path.join(shared_dir, "ctl.sock")}
    args = ("--workers", "1", "--user", user, "--bind", f"unix:{shared_dir}/app.sock",
            *(item for pair in files.items() for item in pair))
    for ending in ("stop", "kill -9"):
        with Balancer(*args, *BACKEND) as b:
            janitor = int(b.wait_for(r"removed at exit by a janitor process \(pid (\d+)\)").group(1))
            assert sorted(os.listdir(shared_dir)) == ["app.sock", "ctl.sock", "master.pid"]
            assert ids_of(janitor)[0][0] == 0 and ids_of(b.pid)[0][0] == accounts["member_uid"]
            workers = b.worker_pids()
            if ending == "stop":
                b.signal(signal.SIGTERM)
                assert b.wait(30) == 0, b.log()
                assert os.listdir(shared_dir) == [] and not pid_alive(janitor)  # it was waited for
            else:
                os.kill(b.pid, signal.SIGKILL)
                b.wait(10)
                deadline = time.monotonic() + 10
                while os.listdir(shared_dir) or pid_alive(janitor):
                    assert time.monotonic() < deadline, os.listdir(shared_dir)
                    time.sleep(0.02)
                for pid in workers:  # its workers end with their master (and are not ours to wait for here)
                    deadline = time.monotonic() + 10
                    while pid_alive(pid):
                        assert time.monotonic() < deadline, f"worker {pid} outlived its master"
                        time.sleep(0.02)
    # A backend that cannot load: one line, exit 3, and nothing left behind.
    done = run(sys.executable, "-m", "balancer", *args, "--metrics-bind", "none", "--backend", "nosuchmod:app",
               check=False)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 3 and len(lines) == 1 and "nosuchmod" in lines[0], done.stderr
    assert os.listdir(shared_dir) == []


def test_a_tls_key_the_user_cannot_read_is_one_line_exit_2(accounts, python_for_others, shared_dir, tmp_path):
    from tests.tlscerts import make_ca, make_signed

    cert, key = make_signed(tmp_path, "server", "localhost", make_ca(tmp_path))
    for path in (cert, key):
        shutil.copy(path, shared_dir)
    key = os.path.join(shared_dir, os.path.basename(key))
    os.chmod(key, 0o600)  # root's alone: root reads it when the options are checked, the user cannot
    done = run(sys.executable, "-m", "balancer", "--bind", "127.0.0.1:0", "--metrics-bind", "none", "--user",
               accounts["member"], "--certfile", os.path.join(shared_dir, os.path.basename(cert)), "--keyfile", key,
               *BACKEND, check=False)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert f"--keyfile {key}: user {accounts['member']} cannot read it: Permission denied" in lines[0]
    assert sorted(os.listdir(shared_dir)) == sorted(os.path.basename(p) for p in (cert, key))
