"""Start-up failures through the real CLI: one line, exit 2 (options, addresses) or 3 (backend), nothing left.

Also the unix-socket binds: a live socket is never taken over, and a socket file is removed at exit only if it
is still the one this master created.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import uuid

import pytest

from tests.harness import HERE, Balancer, pid_alive

pytestmark = pytest.mark.timeout(60)
APP = ("--backend", "testapp:create_app")
# A master's own log lines at INFO or WARNING are not part of the error report.


def marked_processes(mark: str) -> list[int]:
    """Pids of live processes whose environment carries mark: the master and any worker it started."""
    needle = f"BALANCER_TEST_MARK={mark}".encode()
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0") and pid_alive(int(entry)):
                    out.append(int(entry))
        except OSError:
            continue
    return out


def start_failing(tmp_path, *args: str, backend: tuple[str, ...] = APP) -> tuple[subprocess.CompletedProcess, str]:
    """Run the real CLI with a unix bind, metrics, a control socket and a pid file under tmp_path."""
    defaults = {"--metrics-bind": "127.0.0.1:0", "--control-socket": str(tmp_path / "ctl.sock"),
                "--pid-file": str(tmp_path / "master.pid")}
    extra = [item for flag, value in defaults.items() if flag not in args for item in (flag, value)]
    binds = () if "--bind" in args else ("--bind", "127.0.0.1:0")
    mark = uuid.uuid4().hex
    r = subprocess.run([sys.executable, "-m", "balancer", "--workers", "2", "--app-dir", str(HERE / "apps"),
                        "--bind", f"unix:{tmp_path / 'listen.sock'}", *binds, *backend, *extra, *args],
                       capture_output=True, text=True, timeout=40, start_new_session=True,
                       env={**os.environ, "BALANCER_TEST_MARK": mark})
    return r, mark


def assert_one_error_line(r: subprocess.CompletedProcess, code: int, message: str) -> None:
    """Exit code, and stderr exactly one line, the error, which says message: no log line, no traceback."""
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("balancer: error:") and message in lines[0], r.stderr


def assert_nothing_left(tmp_path, mark: str, *ours: str) -> None:
    """No socket or pid file under tmp_path but what the test made itself, and no process of that master."""
    assert sorted(os.listdir(tmp_path)) == sorted(ours)
    assert marked_processes(mark) == []


def test_metrics_port_in_use(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        r, mark = start_failing(tmp_path, "--metrics-bind", f"127.0.0.1:{port}")
    assert_one_error_line(r, 2, f"cannot bind metrics 127.0.0.1:{port}: Address already in use")
    assert_nothing_left(tmp_path, mark)


def test_bind_in_use_after_a_unix_bind(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        r, mark = start_failing(tmp_path, "--bind", f"127.0.0.1:{port}")
    assert_one_error_line(r, 2, f"cannot bind 127.0.0.1:{port}: Address already in use")
    assert_nothing_left(tmp_path, mark)  # the unix socket bound before it is gone too


def test_unwritable_pid_file(tmp_path):
    r, mark = start_failing(tmp_path, "--pid-file", str(tmp_path / "no" / "such" / "master.pid"))
    assert_one_error_line(r, 2, f"cannot write pid file {tmp_path / 'no' / 'such' / 'master.pid'}: "
                                "No such file or directory")
    assert_nothing_left(tmp_path, mark)  # the control socket made just before is gone


def test_pid_file_that_is_a_directory(tmp_path):
    (tmp_path / "pid.d").mkdir()
    r, mark = start_failing(tmp_path, "--pid-file", str(tmp_path / "pid.d"))
    assert_one_error_line(r, 2, f"cannot write pid file {tmp_path / 'pid.d'}: Is a directory")
    assert_nothing_left(tmp_path, mark, "pid.d")
    assert os.listdir(tmp_path / "pid.d") == []


def test_control_socket_in_a_missing_directory(tmp_path):
    r, mark = start_failing(tmp_path, "--control-socket", str(tmp_path / "missing" / "ctl.sock"))
    assert_one_error_line(r, 2, f"cannot create control socket {tmp_path / 'missing' / 'ctl.sock'}: "
                                "No such file or directory")
    assert_nothing_left(tmp_path, mark)  # metrics had started: closed, and the unix bind removed


def test_control_socket_path_taken_by_a_regular_file(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me\n")
    r, mark = start_failing(tmp_path, "--control-socket", str(tmp_path / "notes.txt"))
    assert_one_error_line(r, 2, f"control socket {tmp_path / 'notes.txt'} exists and is not a socket")
    assert_nothing_left(tmp_path, mark, "notes.txt")
    assert (tmp_path / "notes.txt").read_text() == "keep me\n"


def test_backend_import_error_exits_3_and_stops_its_workers(tmp_path):
    r, mark = start_failing(tmp_path, backend=("--backend", "broken_import:app"))
    # The workers had started and the metrics endpoint and control socket were up: what the master said
    # meanwhile is dropped, and the one line left is the error.
    reason = "module 'broken_import' raised at import: RuntimeError: database URL not configured"
    assert_one_error_line(r, 3, f"balancer: error: worker failed to boot: {reason}")
    assert_nothing_left(tmp_path, mark)


# ---- unix binds ---------------------------------------------------------------------------------


def unix_get(path) -> bytes:
    """One GET over the unix socket at path; the whole response."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return b"".join(iter(lambda: sock.recv(65536), b""))


def test_a_second_master_on_a_live_unix_socket_refuses_and_the_first_keeps_it(tmp_path):
    path = tmp_path / "app.sock"
    with Balancer("--workers", "1", "--bind", f"unix:{path}", "--control-socket", str(tmp_path / "c1.sock"),
                  *APP) as first:
        inode = os.stat(path).st_ino
        r, mark = start_failing(tmp_path, "--bind", f"unix:{path}", "--control-socket", str(tmp_path / "c2.sock"),
                                "--pid-file", str(tmp_path / "second.pid"))
        assert_one_error_line(r, 2, f"cannot bind unix:{path}: another process is listening there")
        assert marked_processes(mark) == []
        assert os.stat(path).st_ino == inode  # not unlinked and re-bound
        assert unix_get(path).startswith(b"HTTP/1.1 200")  # the first master still serves it
        assert sorted(os.listdir(tmp_path)) == ["app.sock", "c1.sock"]
        assert first.proc.poll() is None
    assert not path.exists()


def test_a_stale_unix_socket_file_is_replaced(tmp_path):
    path = tmp_path / "app.sock"
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(path))  # closed without unlinking: what a killed server leaves
    with Balancer("--workers", "1", "--bind", f"unix:{path}", "--control-socket", str(tmp_path / "c.sock"),
                  *APP):
        assert unix_get(path).startswith(b"HTTP/1.1 200")
    assert not path.exists()


def test_a_unix_socket_replaced_by_someone_else_is_not_removed_at_exit(tmp_path):
    path, ctl = tmp_path / "app.sock", tmp_path / "c.sock"
    with Balancer("--workers", "1", "--bind", f"unix:{path}", "--control-socket", str(ctl), *APP) as b:
        os.unlink(path)
        successor = socket.socket(socket.AF_UNIX)
        successor.bind(str(path))  # another server took the path over
        successor.listen(1)
        os.unlink(ctl)
        other_ctl = socket.socket(socket.AF_UNIX)
        other_ctl.bind(str(ctl))  # and its control socket
        try:
            mine = os.stat(path).st_ino, os.stat(ctl).st_ino
            b.signal(signal.SIGTERM)
            assert b.wait(30) == 0
            assert (os.stat(path).st_ino, os.stat(ctl).st_ino) == mine  # both still there, untouched
            with socket.socket(socket.AF_UNIX) as client:
                client.connect(str(path))  # and still served by the successor
        finally:
            successor.close()
            other_ctl.close()
    assert not [p for p in b.worker_pids() if pid_alive(p)]
