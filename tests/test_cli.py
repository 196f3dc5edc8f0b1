"""The command line through the real CLI: subcommands, short flags, other servers' habits, a positional backend."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from balancer.cli import build_parser
from tests.harness import Balancer
from tests.test_config_sources import assert_one_error, balancer, clean_env, effective
from tests.test_integration import fetch
from tests.test_startup import assert_nothing_left, assert_one_error_line, start_failing

pytestmark = pytest.mark.timeout(60)
SUBCOMMANDS = "{run,reload,scale,stop,status,ls,upgrade,config}"


def test_usage_line_shows_the_subcommands():
    r = balancer("--help")
    # argparse wraps the usage line at the terminal's width: compare it with its whitespace folded
    assert r.returncode == 0 and " ".join(r.stdout.split()).startswith(
        f"usage: balancer [-h] [--version] {SUBCOMMANDS}"), r.stdout


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
    assert "'run', 'reload', 'scale', 'stop', 'status', 'ls', 'upgrade', 'config'" in r.stderr


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


# ---- gunicorn's and uvicorn's habits ----------------------------------------------------------------------

@pytest.mark.parametrize("args,meant", [
    (("app.py",), "--backend app:app"),
    (("app",), "--backend app:app"),
    (("src/app.py", "-w", "2"), "--app-dir src --backend app:app"),
    (("run", "pkg.web"), "--backend pkg.web:app"),
    (("--backend", "app.py"), "--backend app:app"),
])
def test_a_file_or_module_without_attr_says_module_attr(args, meant):
    r = balancer(*args, "--metrics-bind", "none")
    assert_one_error(r, "expected MODULE:ATTR, e.g. ")
    assert f"did you mean {meant}?" in r.stderr, r.stderr


def habit_error(capsys, *args: str) -> str:
    """The one line the run parser answers args with, after checking it exits 2."""
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(list(args))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1, err
    return err


def test_every_habit_flag_is_one_line_naming_balancers_equivalent(capsys):
    from balancer.cli import COMMANDS
    from balancer.habits import HABITS, markdown

    ours = {flag for action in build_parser()._actions for flag in action.option_strings
            if action.help != argparse.SUPPRESS}
    table = markdown()
    for habit in HABITS:
        assert habit.instead in ours | set(COMMANDS) | {""}, habit  # an equivalent that exists
        assert habit.instead in habit.says, habit
        for flag in habit.flags:
            assert flag not in ours, flag  # a flag balancer has is no habit
            for args in ((flag,), (flag, "5", "app:app"), (f"{flag}=5",) if flag.startswith("--") else (flag,)):
                err = habit_error(capsys, *args)
                assert err.startswith(f"balancer: error: {flag} is {habit.server}'s; {habit.says}"), err
            assert f"`{flag}`" in table


def test_habit_flags_through_the_real_cli():
    assert_one_error(balancer("--keep-alive", "5", "app:app"), "--keep-alive is gunicorn's; balancer calls it "
                                                               "--keepalive-timeout")
    assert_one_error(balancer("config", "--host", "0.0.0.0"), "--host is uvicorn's; balancer takes HOST:PORT in "
                                                               "--bind")
    assert_one_error(balancer("app:app", "-D"), "-D is gunicorn's; balancer stays in the foreground")


def test_a_gunicorn_python_config_file_is_told_balancer_reads_toml(tmp_path):
    conf = tmp_path / "gunicorn.conf.py"
    conf.write_text('bind = "127.0.0.1:8000"\nworkers = 2\nimport multiprocessing\n')
    assert_one_error(balancer("config", "-c", str(conf)), f"bad config file {conf}: balancer reads TOML (keys: the "
                                                          "long option names, e.g. workers = 4), not a Python file")


def test_log_level_and_other_choices_take_any_case(tmp_path):
    conf = tmp_path / "b.toml"
    conf.write_text('log_format = "JSON"\n')
    opts = effective("--log-level", "INFO", "--loop", "AsyncIO", "-c", str(conf))
    assert (opts["log_level"]["value"], opts["loop"]["value"], opts["log_format"]["value"]) == \
        ("info", "asyncio", "json")
    opts = effective(env=clean_env(BALANCER_LOG_LEVEL="Debug"))
    assert opts["log_level"]["value"] == "debug"
    assert_one_error(balancer("config", "--log-level", "LOUD"), "invalid choice: 'loud'")


def test_pid_is_an_alias_and_prefixes_are_not_options(tmp_path):
    opts = effective("--pid", str(tmp_path / "m.pid"))
    assert opts["pid_file"] == {"value": str(tmp_path / "m.pid"), "source": "cli", "detail": "--pid-file"}
    assert_one_error(balancer("config", "--pid-f", "x"), "unrecognized arguments: --pid-f")
    assert_one_error(balancer("config", "--work", "2"), "unrecognized arguments: --work")


def test_an_app_dir_that_is_no_directory_is_one_line(tmp_path):
    assert_one_error(balancer("config", "--app-dir", str(tmp_path / "none")),
                     f"--app-dir {tmp_path / 'none'}: no such directory")
    (tmp_path / "file").write_text("")
    assert_one_error(balancer("--app-dir", str(tmp_path / "file"), "--metrics-bind", "none", "--bind", "127.0.0.1:0"),
                     f"--app-dir {tmp_path / 'file'}: not a directory")
    assert_one_error(balancer("config", env=clean_env(BALANCER_APP_DIR=str(tmp_path / "none"))),
                     "no such directory (from env BALANCER_APP_DIR)")


def test_a_module_that_calls_run_app_at_import_is_told_to_guard_it(tmp_path):
    r, mark = start_failing(tmp_path, backend=("runapp_at_import:make_app",))
    assert_one_error_line(r, 3, "raised at import: RuntimeError: web.run_app() called while balancer loads the "
                                'app, which it serves itself: guard that call with `if __name__ == "__main__":`')
    assert_nothing_left(tmp_path, mark)
