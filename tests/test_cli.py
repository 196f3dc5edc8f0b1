"""The command line through the real CLI: subcommands, gunicorn's short flags, a positional backend."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.harness import Balancer
from tests.test_config_sources import assert_one_error, balancer, effective
from tests.test_integration import fetch

pytestmark = pytest.mark.timeout(60)
SUBCOMMANDS = "{run,reload,scale,stop,status,ls,config}"


def test_usage_line_shows_the_subcommands():
    r = balancer("--help")
    assert r.returncode == 0 and r.stdout.startswith(f"usage: balancer [-h] [--version] {SUBCOMMANDS}"), r.stdout


def test_help_lists_every_run_option_with_its_default():
    # `balancer --help` is where a user looks first; run is what a bare `balancer` does, so its options show.
    from balancer.config import option_fields
    from balancer.sources import flag_of

    r = balancer("--help")
    assert r.returncode == 0, r.stderr
    missing = [f.name for f in option_fields() if (f.metadata.get("flag") or flag_of(f.name)) not in r.stdout]
    assert not missing, missing
    assert SUBCOMMANDS in r.stdout and "(default: 1000)" in r.stdout


def test_a_mistyped_subcommand_is_an_error_naming_them():
    r = balancer("stauts")
    assert_one_error(r, "invalid choice: 'stauts'")
    assert "'run', 'reload', 'scale', 'stop', 'status', 'ls', 'config'" in r.stderr


@pytest.mark.parametrize("args,message", [
    (("--wrokers", "2"), "unrecognized arguments: --wrokers"),
    (("run", "--workers", "0"), "--workers must be at least 1"),
    (("-w", "two"), "argument -w/--workers: invalid int value: 'two'"),
    (("app:one", "--backend", "app:two"), "two backends given"),
    (("scale",), "the following arguments are required: n"),
])
def test_bad_options_are_one_line_and_exit_2(args, message):
    assert_one_error(balancer(*args, "--metrics-bind", "none") if args[0] != "scale" else balancer(*args), message)


def test_short_flags_and_a_positional_backend(tmp_path):
    conf = tmp_path / "b.toml"
    conf.write_text("max_requests = 3\n")
    opts = effective("-w", "3", "-b", "127.0.0.1:7001", "-b", "unix:/tmp/x.sock", "-t", "7", "-c", str(conf),
                     "myapp:handler")
    assert opts["workers"]["value"] == 3 and opts["timeout"]["value"] == 7.0
    assert opts["bind"]["value"] == ["127.0.0.1:7001", "unix:/tmp/x.sock"]
    assert opts["max_requests"] == {"value": 3, "source": "file", "detail": str(conf)}
    assert opts["backend"] == {"value": "myapp:handler", "source": "cli", "detail": "--backend"}


def test_the_config_subcommand_prints_toml_it_can_read_back(tmp_path):
    r = balancer("config", "-w", "3", "myapp:handler")
    assert r.returncode == 0, r.stderr
    assert 'workers = 3  # cli --workers' in r.stdout.splitlines()
    conf = tmp_path / "again.toml"
    conf.write_text(r.stdout)
    again = effective("-c", str(conf))
    assert again["workers"]["value"] == 3 and again["backend"]["value"] == "myapp:handler"
    assert again["backend"]["source"] == "file"


def test_a_positional_backend_serves_without_a_subcommand():
    with Balancer("-w", "1", "-t", "7", "testapp:create_app") as b:
        b.wait_for(r"balancer 1 workers serving")
        resp = fetch(b, "/")  # testapp's whoami, not the default hello handler
        assert resp.status == 200 and int(resp.getheader("X-Worker-Pid")) in b.worker_pids()


def test_control_subcommands_are_subparsers(tmp_path):
    r = balancer("status", "--help")
    assert r.returncode == 0 and r.stdout.startswith("usage: balancer status") and "--control-socket" in r.stdout
    r = balancer("status", "--control-socket", str(tmp_path / "none.sock"))
    assert_one_error(r, f"no balancer master at {tmp_path / 'none.sock'}")


def test_version_still_answers():
    r = subprocess.run([sys.executable, "-m", "balancer", "--version"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.startswith("balancer ")
