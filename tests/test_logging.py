"""Logging: gunicorn's access-log atoms, access and error files reopened on SIGUSR1, JSON lines, --log-config."""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from balancer.accessformat import AccessFormatError
from balancer.logs import DEFAULT_ACCESS_LOG_FORMAT
from balancer_workers.accesslog import AccessLog, compile_format
from tests.harness import HERE, SERVING, Balancer, unix_request
from tests.test_sockets_privileges import accounts, python_for_others, shared_dir  # noqa: F401 (fixtures)

pytestmark = pytest.mark.timeout(60)
CLF_TIME = r"\[\d\d/[A-Z][a-z]{2}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}\]"
# The combined log format plus the duration, and nothing else on the line: its only timestamp is %(t)s.
COMBINED = re.compile(rf'^(\S+) - (\S+) {CLF_TIME} "([^"]*)" (\d{{3}}) (\d+|-) "([^"]*)" "([^"]*)" (\d+\.\d{{6}})$')
APP = ("--backend", "testapp:create_app")


class Lines(logging.Handler):
    """Keeps what it is given, for assertions."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def capture(name: str) -> tuple[logging.Logger, Lines]:
    """A private logger and the handler that keeps its records."""
    logger = logging.getLogger(name)
    logger.handlers[:] = []
    logger.propagate = False
    logger.setLevel(logging.INFO)
    lines = Lines()
    logger.addHandler(lines)
    return logger, lines


def serve_and_log(access: AccessLog, requests, unix_path: str = "") -> None:
    """A real aiohttp server whose access-log hook calls access.log; run the client coroutine requests(url)."""

    class Hook(AbstractAccessLogger):
        def log(self, request, response, time):
            access.log(request, response, time)

    async def handler(request: web.Request) -> web.Response:
        if request.path == "/stream":
            response = web.StreamResponse(headers={"X-Out": "streamed"})
            await response.prepare(request)
            await response.write(b"x" * 1000)
            await response.write_eof()
            return response
        return web.Response(text="hello world\n", status=201, headers={"X-Out": "out value"})

    async def main():
        runner = web.ServerRunner(web.Server(handler, access_log_class=Hook, access_log=logging.getLogger("unused")))
        await runner.setup()
        site = web.UnixSite(runner, unix_path) if unix_path else web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        try:
            url = "http://sock" if unix_path else f"http://127.0.0.1:{runner.addresses[0][1]}"
            await requests(url)
        finally:
            await runner.cleanup()

    asyncio.run(main())


# ---- the access line, on real aiohttp requests ----------------------------------------------------------


def test_every_gunicorn_atom_renders_from_a_real_request(monkeypatch):
    logger, lines = capture("test.access.atoms")
    monkeypatch.setenv("BALANCER_TEST_ENV", "env value")
    fmt = ("h=%(h)s l=%(l)s u=%(u)s r=[%(r)s] m=%(m)s U=%(U)s q=%(q)s H=%(H)s s=%(s)s B=%(B)s b=%(b)s f=%(f)s "
           "a=[%(a)s] T=%(T)s M=%(M)s D=%(D)s L=%(L)s p=%(p)s i=%({X-Req}i)s o=%({x-out}o)s e=%({BALANCER_TEST_ENV}e)s "
           "none=%({X-Absent}i)s unknown=%(zz)s pct=100%%")
    access = AccessLog(fmt, logger)
    auth = "Basic " + base64.b64encode(b"alice:secret").decode()

    async def requests(url):
        async with aiohttp.ClientSession() as session:
            async with session.get(url + "/p/a?x=1&y=2", headers={"X-Req": "in value", "Referer": "http://ref/",
                                                                  "User-Agent": 'agent "quoted"',
                                                                  "Authorization": auth}) as resp:
                assert resp.status == 201
            async with session.head(url + "/") as resp:
                assert resp.status == 201

    serve_and_log(access, requests)
    get, head = (record.getMessage() for record in lines.records)
    m = re.fullmatch(re.escape('h=127.0.0.1 l=- u=alice r=[GET /p/a?x=1&y=2 HTTP/1.1] m=GET U=/p/a q=x=1&y=2 '
                               'H=HTTP/1.1 s=201 B=12 b=12 f=http://ref/ a=[agent \\"quoted\\"] T=0 ')
                     + r"M=(\d+) D=(\d+) L=(\d+\.\d{6}) "
                     + re.escape(f"p=<{os.getpid()}> i=in value o=out value e=env value none=- unknown=- pct=100%"),
                     get)
    assert m, get  # a quote in a header is escaped: it cannot end the quoted field early
    ms, us, seconds = int(m.group(1)), int(m.group(2)), float(m.group(3))
    assert 0 < us < 1_000_000 and ms == us // 1000 and abs(seconds - us / 1e6) < 1e-5
    assert re.search(r" u=- .* B=0 b=- ", head)  # no credentials; a HEAD answer has no body


def test_the_default_format_is_combined_plus_duration_and_t_is_the_request_start():
    logger, lines = capture("test.access.default")
    access = AccessLog(DEFAULT_ACCESS_LOG_FORMAT, logger)

    async def requests(url):
        async with aiohttp.ClientSession() as session:
            async with session.get(url + "/stream", headers={"User-Agent": "ua/1"}) as resp:
                assert await resp.read() == b"x" * 1000

    before = time.time()
    serve_and_log(access, requests)
    m = COMBINED.match(lines.records[0].getMessage())
    assert m, lines.records[0].getMessage()
    assert m.groups()[:7] == ("127.0.0.1", "-", "GET /stream HTTP/1.1", "200", m.group(5), "-", "ua/1")
    assert int(m.group(5)) >= 1000  # streamed, no Content-Length: what aiohttp wrote
    stamp = re.search(r"\[(.*?)\]", lines.records[0].getMessage()).group(1)
    assert abs(time.mktime(time.strptime(stamp, "%d/%b/%Y:%H:%M:%S %z")) - before) < 5


def test_a_unix_socket_client_is_named_by_the_socket(tmp_path):
    logger, lines = capture("test.access.unix")
    path = str(tmp_path / "app.sock")
    access = AccessLog("%(h)s %(s)s", logger)

    async def requests(url):
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path)) as session:
            async with session.get(url + "/") as resp:
                assert resp.status == 201

    serve_and_log(access, requests, unix_path=path)
    assert lines.records[0].getMessage() == f"unix:{path} 201"


def test_json_access_records_carry_the_request_fields():
    logger, lines = capture("test.access.json")
    access = AccessLog(DEFAULT_ACCESS_LOG_FORMAT, logger, as_json=True)

    async def requests(url):
        async with aiohttp.ClientSession() as session:
            async with session.get(url + "/j?k=v", headers={"User-Agent": "ua/2"}) as resp:
                assert resp.status == 201

    serve_and_log(access, requests)
    record = lines.records[0]
    assert record.getMessage() == "GET /j?k=v HTTP/1.1 201"
    assert (record.remote, record.method, record.path, record.query, record.protocol, record.status, record.bytes,
            record.referer, record.user_agent) == ("127.0.0.1", "GET", "/j", "k=v", "HTTP/1.1", 201, 12, None, "ua/2")
    assert 0 < record.duration < 5


def test_the_format_compiles_to_one_getter_per_dynamic_atom():
    template, getters = compile_format('%(h)s %(l)s %(p)s "%(r)s" %(unknown)s 5%%')
    assert template == f'%s - <{os.getpid()}> "%s" - 5%%' and len(getters) == 2
    for bad in ("50% done", "%(h)", "%(h)d"):
        with pytest.raises(AccessFormatError):
            compile_format(bad)


# ---- through the real CLI ---------------------------------------------------------------------------------


def get(port: int, path: str = "/", headers: dict | None = None) -> int:
    """One request with Connection: close; its status."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path, headers={"Connection": "close", **(headers or {})})
    resp = conn.getresponse()
    resp.read()
    conn.close()
    return resp.status


def get_unix(path: str, target: str = "/") -> bytes:
    """One raw request over a unix socket; the answer's status line."""
    return unix_request(path, target).split(b"\r\n", 1)[0]


def wait_in_file(path, pattern: str, timeout: float = 20.0, count: int = 1) -> list[re.Match]:
    """Poll a log file until count lines match pattern; the matches."""
    rx = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(path) as f:
                found = [m for m in map(rx.search, f) if m]
        except FileNotFoundError:
            found = []
        if len(found) >= count:
            return found
        if time.monotonic() > deadline:
            text = open(path).read() if os.path.exists(path) else "(no file)"
            raise AssertionError(f"{count} lines matching {pattern!r} not in {path} in {timeout}s:\n{text}")
        time.sleep(0.05)


def test_access_lines_are_combined_plus_duration_on_stdout_with_one_timestamp():
    with Balancer(*APP, "--workers", "1", "--access-logfile", "-") as b:
        mark = b.mark()
        assert get(b.port, "/?q=1", {"Referer": "http://ref/", "User-Agent": "ua/1"}) == 200
        line = b.wait_for(r'"GET /\?q=1 HTTP/1.1"', 10, start=mark).string
        m = COMBINED.match(line)
        assert m, line  # anchored: no second timestamp or level prefix around the access format
        assert (m.group(1), m.group(3), m.group(4), m.group(6), m.group(7)) == (
            "127.0.0.1", "GET /?q=1 HTTP/1.1", "200", "http://ref/", "ua/1")
        assert get(b.port, "/crash") == 500  # aiohttp's 500 for a crashing handler is logged too
        b.wait_for(r'^127\.0\.0\.1 - - .*"GET /crash HTTP/1.1" 500 ', 10, start=mark)


def test_access_log_format_atoms_through_the_cli():
    fmt = '%(m)s %(U)s %(q)s %(H)s %(s)s %({X-Req}i)s %({X-Worker-Slot}o)s %(p)s'
    with Balancer(*APP, "--workers", "1", "--access-log-format", fmt, "--access-log") as b:
        mark = b.mark()
        assert get(b.port, "/?a=b", {"X-Req": "abc"}) == 200
        pid = b.worker_pids()[0]
        b.wait_for(rf"^GET / a=b HTTP/1.1 200 abc 0 <{pid}>$", 10, start=mark)


def test_access_lines_whatever_the_log_level_and_unix_clients_named_by_socket(tmp_path):
    path = str(tmp_path / "app.sock")
    with Balancer(*APP, "--workers", "1", "--access-log", "--log-level", "error", "--bind", f"unix:{path}",
                  ready=False) as b:
        deadline = time.monotonic() + 20
        while not os.path.exists(path):  # the master listens before its workers are up; the request waits
            assert time.monotonic() < deadline and b.proc.poll() is None, b.log()
            time.sleep(0.05)
        assert get_unix(path, "/?via=unix") == b"HTTP/1.1 200 OK"
        b.wait_for(rf'^unix:{re.escape(path)} - - {CLF_TIME} "GET /\?via=unix HTTP/1.1" 200 ', 10)
        assert not any(" INFO " in line for line in b.lines), b.log()  # --log-level error holds for the rest


def test_json_lines_from_master_and_workers():
    with Balancer(*APP, "--workers", "1", "--log-format", "json", "--access-log") as b:
        assert get(b.port, "/crash", {"User-Agent": "ua/j"}) == 500
        b.wait_for(r'"logger": "balancer.access"', 10)
        b.wait_for(r'"role": "worker".*handler crashed on purpose|handler crashed on purpose.*"role": "worker"', 10)
        b.signal(signal.SIGTERM)
        assert b.wait(20) == 0
    records = [json.loads(line) for line in b.lines if line.strip()]  # every line is one JSON object
    master = next(r for r in records if "workers serving on" in r["message"])
    assert (master["role"], master["slot"], master["level"], master["pid"]) == ("master", None, "INFO", b.pid)
    access = next(r for r in records if r["logger"] == "balancer.access")
    assert (access["role"], access["slot"], access["method"], access["path"], access["status"],
            access["user_agent"], access["remote"]) == ("worker", 0, "GET", "/crash", 500, "ua/j", "127.0.0.1")
    error = next(r for r in records if r["role"] == "worker" and r["level"] == "ERROR")
    assert "RuntimeError: handler crashed on purpose" in error["exc"]
    for r in records:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", r["time"]), r


@pytest.mark.parametrize("kind", ["json", "toml"])
def test_log_config_applies_in_master_and_workers(tmp_path, kind):
    config = {"version": 1,
              "formatters": {"mine": {"format": "MINE %(levelname)s %(name)s: %(message)s"}},
              "handlers": {"out": {"class": "logging.StreamHandler", "formatter": "mine",
                                   "stream": "ext://sys.stderr"}},
              "root": {"level": "INFO", "handlers": ["out"]}}
    path = tmp_path / f"logging.{kind}"
    if kind == "json":
        path.write_text(json.dumps(config))
    else:
        path.write_text('version = 1\n[formatters.mine]\nformat = "MINE %(levelname)s %(name)s: %(message)s"\n'
                        '[handlers.out]\nclass = "logging.StreamHandler"\nformatter = "mine"\n'
                        'stream = "ext://sys.stderr"\n[root]\nlevel = "INFO"\nhandlers = ["out"]\n')
    with Balancer(*APP, "--workers", "1", "--log-config", str(path)) as b:
        b.wait_for(r"^MINE INFO balancer: balancer 1 workers serving on ", 5)
        assert get(b.port, "/crash") == 500
        b.wait_for(r"^MINE ERROR aiohttp.server: ", 10)  # a worker's line, through the same config


def test_access_and_error_files_are_reopened_on_sigusr1(tmp_path):
    access, errors = tmp_path / "access.log", tmp_path / "error.log"
    with Balancer(*APP, "--workers", "2", "--access-logfile", str(access), "--error-logfile", str(errors),
                  "--log-level", "debug", ready=False) as b:
        port = int(wait_in_file(errors, SERVING.pattern)[0].group(1).rsplit(":", 1)[1])
        workers = sorted(b.worker_pids())
        assert get(port, "/?before") == 200
        wait_in_file(access, r'"GET /\?before HTTP/1.1" 200')
        os.rename(access, tmp_path / "access.log.1")  # what logrotate does, then it sends SIGUSR1
        os.rename(errors, tmp_path / "error.log.1")
        b.signal(signal.SIGUSR1)
        wait_in_file(errors, r"\[balancer master pid=\d+\] INFO SIGUSR1: log files reopened \(1\)")
        # Each worker writes its own line into the new error log once it has reopened its files.
        reopened = wait_in_file(errors, r"\[worker slot=\d pid=(\d+)\] DEBUG SIGUSR1: log files reopened \(2\)",
                                count=2)
        assert sorted(int(m.group(1)) for m in reopened) == workers  # both, and not killed by the signal
        for i in range(4):
            assert get(port, f"/?after={i}") == 200
        wait_in_file(access, r'"GET /\?after=\d HTTP/1.1" 200', count=4)
        assert "after" not in (tmp_path / "access.log.1").read_text()
        assert sorted(b.worker_pids()) == workers
        assert b.lines == [] or all("Traceback" not in line for line in b.lines), b.log()


def test_a_worker_still_booting_at_sigusr1_is_told_once_ready_instead_of_killed():
    # Until its first lines ignore SIGUSR1, the signal's default action would end a fresh worker.
    with Balancer(*APP, "--workers", "1", "--log-level", "debug") as b:
        mark = b.mark()
        b.signal(signal.SIGHUP)
        new = b.wait_for(r"spawned worker slot=0 pid=(\d+) generation=", 10, start=mark).group(1)
        b.signal(signal.SIGUSR1)  # the replacement has only just been started
        b.wait_for("rolling reload done", 20, start=mark)
        b.wait_for(rf"\[worker slot=0 pid={new}\] DEBUG SIGUSR1: log files reopened", 10, start=mark)
        assert not re.search(r"failed|died|SIGUSR1\)", "\n".join(b.lines[mark:])), b.log()


def test_a_reload_sets_logging_up_again_from_the_config_file(tmp_path):
    conf = tmp_path / "balancer.toml"
    conf.write_text('log_format = "text"\n')
    with Balancer(*APP, "--workers", "1", "--access-log", "-c", str(conf)) as b:
        mark = b.mark()
        conf.write_text('log_format = "json"\n')
        b.signal(signal.SIGHUP)
        b.wait_for(r'^\{.*"role": "master".*"message": "rolling reload done', 20, start=mark)
        assert get(b.port, "/?after-reload") == 200
        line = b.wait_for(r'^\{.*after-reload', 10, start=mark).string
        assert json.loads(line)["role"] == "worker"  # the reload's workers write JSON too


@pytest.mark.skipif(os.geteuid() != 0, reason="creates a user: needs root")
def test_with_user_the_log_files_are_given_to_it_so_workers_and_reopen_can_write(accounts, python_for_others,
                                                                                  shared_dir):
    # The master opens (creates) the files as root; its workers and, after SIGUSR1, the master itself open
    # them again as --user. A logrotate "create" directive gives the directory to that user, as this does.
    os.chown(shared_dir, accounts["member_uid"], accounts["member_gid"])
    access, errors = os.path.join(shared_dir, "access.log"), os.path.join(shared_dir, "error.log")
    with Balancer("--workers", "1", "--user", accounts["member"], "--access-logfile", access,
                  "--error-logfile", errors, ready=False) as b:
        port = int(wait_in_file(errors, SERVING.pattern)[0].group(1).rsplit(":", 1)[1])
        assert get(port, "/?as-user") == 200
        wait_in_file(access, r'"GET /\?as-user HTTP/1.1" 200')
        assert {os.stat(path).st_uid for path in (access, errors)} == {accounts["member_uid"]}
        os.rename(access, access + ".1")
        b.signal(signal.SIGUSR1)
        wait_in_file(errors, r"INFO SIGUSR1: log files reopened \(1\)")
        assert get(port, "/?rotated") == 200
        wait_in_file(access, r'"GET /\?rotated HTTP/1.1" 200')  # a new file, made by the worker as the user


@pytest.mark.parametrize("args, message", [
    (["--access-log-format", "%(h)s 50% done"], "bad --access-log-format"),
    (["--log-config", "/nonexistent/logging.json"], "cannot read --log-config /nonexistent/logging.json"),
    (["--log-format", "xml"], "--log-format"),
    (["--error-logfile", "/nonexistent/dir/error.log"], "cannot open log file /nonexistent/dir/error.log"),
    (["--access-logfile", "/nonexistent/dir/access.log"], "cannot open log file /nonexistent/dir/access.log"),
])
def test_bad_logging_options_stop_start_up_with_one_line(args, message):
    proc = subprocess.run([sys.executable, "-m", "balancer", "--bind", "127.0.0.1:0", "--metrics-bind", "none",
                           *args], capture_output=True, text=True, timeout=30, cwd=HERE)
    assert proc.returncode == 2, proc
    assert proc.stdout == "" and len(proc.stderr.splitlines()) == 1 and message in proc.stderr, proc.stderr
