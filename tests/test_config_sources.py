"""Options from the command line, the environment and a TOML file, through the real CLI; SIGHUP re-reads the file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from balancer import cpus
from tests.harness import Balancer
from tests.test_integration import fetch

pytestmark = pytest.mark.timeout(60)


def clean_env(**extra: str) -> dict:
    """Our environment without any balancer option or WEB_CONCURRENCY, plus extra."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BALANCER_") and k != "WEB_CONCURRENCY"}
    return {**env, **extra}


def balancer(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "balancer", *args], capture_output=True, text=True, timeout=30,
                          env=clean_env() if env is None else env)


def effective(*args: str, env: dict | None = None) -> dict:
    """`balancer config --json`: option -> {value, source, detail}."""
    r = balancer("config", "--json", *args, env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["options"]


def assert_one_error(r: subprocess.CompletedProcess, message: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("balancer: error:") and message in lines[0], r.stderr


def test_command_line_beats_environment_beats_file_beats_defaults(tmp_path):
    conf = tmp_path / "balancer.toml"
    conf.write_text('workers = 5\nmax-requests = 7\ntimeout = 11\naccess_log = true\n'
                    'bind = ["127.0.0.1:7001", "127.0.0.1:7002"]\n')
    env = clean_env(WEB_CONCURRENCY="9", BALANCER_WORKERS="4", BALANCER_ACCESS_LOG="no",
                    BALANCER_TIMEOUT="13")
    opts = effective("-c", str(conf), "--timeout", "12", env=env)
    assert (opts["workers"]["value"], opts["workers"]["source"], opts["workers"]["detail"]) == \
        (4, "env", "BALANCER_WORKERS")  # BALANCER_WORKERS wins over WEB_CONCURRENCY
    assert (opts["access_log"]["value"], opts["access_log"]["source"]) == (False, "env")
    assert (opts["timeout"]["value"], opts["timeout"]["source"]) == (12.0, "cli")
    assert (opts["max_requests"]["value"], opts["max_requests"]["source"]) == (7, "file")
    assert opts["bind"] == {"value": ["127.0.0.1:7001", "127.0.0.1:7002"], "source": "file", "detail": str(conf)}
    assert (opts["header_timeout"]["value"], opts["header_timeout"]["source"]) == (10.0, "default")


def test_config_file_from_the_environment_and_lists_in_variables(tmp_path):
    conf = tmp_path / "b.toml"
    conf.write_text('backend = "myapp:handler"\n')
    opts = effective(env=clean_env(BALANCER_CONFIG=str(conf), BALANCER_BIND="127.0.0.1:1, 127.0.0.1:2 unix:/x",
                                   BALANCER_TCP_KEEPALIVE="0"))
    assert (opts["backend"]["value"], opts["backend"]["source"]) == ("myapp:handler", "file")
    assert opts["bind"]["value"] == ["127.0.0.1:1", "127.0.0.1:2", "unix:/x"]
    assert opts["tcp_keepalive"]["value"] is False


def test_the_default_worker_count_says_where_it_came_from():
    opts = effective()
    assert opts["workers"]["value"] == cpus.available_cpus() and opts["workers"]["source"] == "default"
    assert "affinity" in opts["workers"]["detail"] and "cgroup quota" in opts["workers"]["detail"]
    text = balancer("config").stdout
    assert f"workers = {cpus.available_cpus()}  # default (CPUs this process may use" in text


@pytest.mark.parametrize("content,message", [
    ("wrokers = 2\n", "unknown option 'wrokers' in "),
    ('workers = "four"\n', "bad workers in "),
    ("workers = [\n", "bad config file "),
    ("access_log = 1\n", "expected true or false"),
    ("workers = 0\n", "--workers must be at least 1, got 0 (from file "),
    ('ca_certs = "ca.pem"\n', "--ca-certs needs --certfile (from file "),
    ("max_requests = 5\nmax-requests = 6\n", "option max_requests is set twice in "),
])
def test_a_bad_file_is_one_line_and_exit_2(tmp_path, content, message):
    conf = tmp_path / "bad.toml"
    conf.write_text(content)
    assert_one_error(balancer("config", "-c", str(conf)), message)
    assert_one_error(balancer("-c", str(conf), "--bind", "127.0.0.1:0", "--metrics-bind", "none"), message)


def test_bad_environment_values_and_a_missing_file_are_one_line(tmp_path):
    assert_one_error(balancer("config", env=clean_env(BALANCER_TCP_KEEPALIVE="maybe")),
                     "bad BALANCER_TCP_KEEPALIVE 'maybe'")
    assert_one_error(balancer("config", env=clean_env(WEB_CONCURRENCY="lots")), "bad WEB_CONCURRENCY 'lots'")
    assert_one_error(balancer("config", env=clean_env(BALANCER_BACKLOG="0")),
                     "--backlog must be at least 1, got 0 (from env BALANCER_BACKLOG)")
    assert_one_error(balancer("config", "-c", str(tmp_path / "none.toml")), "cannot read config file")
    bad_bind = tmp_path / "bind.toml"
    bad_bind.write_text('bind = ["bad"]\n')
    assert_one_error(balancer("config", "-c", str(bad_bind)),
                     "--bind: bad bind 'bad': expected HOST:PORT, [IPV6]:PORT or unix:/path (from file ")
    assert_one_error(balancer("config", env=clean_env(BALANCER_BIND="nowhere")),
                     "--bind: bad bind 'nowhere'")
    assert_one_error(balancer("config", env=clean_env(BALANCER_BIND="nowhere")), "(from env BALANCER_BIND)")
    assert_one_error(balancer("config", env=clean_env(BALANCER_CIPHERS="HIGH")),
                     "--ciphers needs --certfile (from env BALANCER_CIPHERS)")
    # out of range is said as such, whatever else is missing
    assert_one_error(balancer("config", "--cert-reqs", "5"), "--cert-reqs must be 0 (none), 1 (optional) or 2")


def test_worker_count_from_the_environment_in_a_real_run():
    # 3: neither this machine's CPU default nor BALANCER_WORKERS, so each source is told apart.
    with Balancer("--backend", "testapp:create_app", env={"WEB_CONCURRENCY": "3"}) as b:
        b.wait_for(r"balancer 3 workers serving")
        assert len(b.worker_pids()) == 3
    with Balancer("--backend", "testapp:create_app", env={"WEB_CONCURRENCY": "3", "BALANCER_WORKERS": "1"}) as b:
        b.wait_for(r"balancer 1 workers serving")
        assert len(b.worker_pids()) == 1


def test_sighup_rereads_the_file_applies_what_it_can_and_names_the_rest(tmp_path):
    conf = tmp_path / "balancer.toml"
    conf.write_text('backend = "testapp:create_app"\nworkers = 1\n')
    with Balancer("-c", str(conf)) as b:
        assert fetch(b, "/hog").status == 404
        conf.write_text('backend = "testapp:create_app_with_hog"\nworkers = 1\nbacklog = 64\n'
                        'socket_mode = "0600"\n')
        mark = b.mark()
        b.signal(signal.SIGHUP)
        b.wait_for(r"changed in the config file but needs a restart: --backlog, --socket-mode", start=mark)
        b.wait_for(r"reload applies from the config file: --backend", start=mark)
        b.wait_for(r"rolling reload done", start=mark)
        assert fetch(b, "/hog").status == 200

        conf.write_text("workers = 0\n")  # invalid: the reload goes on with what runs now
        mark = b.mark()
        b.signal(signal.SIGHUP)
        b.wait_for(r"ERROR reload keeps the old configuration: --workers must be at least 1", start=mark)
        b.wait_for(r"rolling reload done", start=mark)
        assert fetch(b, "/hog").status == 200 and b.proc.poll() is None
