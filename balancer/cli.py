"""Command line: `balancer [run] [options] [MODULE:ATTR]`, generated from Config, plus its subcommands."""

from __future__ import annotations

import argparse
import difflib
import functools
import json
import os
import signal
import sys

from balancer import __version__, privileges
from balancer.config import Config, ConfigError, option_fields
from balancer.habits import HABITS, looks_like_module
from balancer.logs import LogSetupError, StartupHold, setup_master_logging
from balancer.signals import HANDLED_SIGNALS
from balancer.sources import Resolved, config_file_of, default_of, describe, flag_of, resolve

CONTROL_COMMANDS = ("reload", "scale", "stop", "status", "ls", "upgrade")
COMMANDS = ("run", *CONTROL_COMMANDS, "config")
SHORT_FLAGS = {"workers": "-w", "bind": "-b", "timeout": "-t"}  # the ones gunicorn users type; -c is --config
HELP = {
    "run": "start the master and its workers (the default when no subcommand is given)",
    "reload": "rolling reload of a running master's workers (SIGHUP)",
    "scale": "change a running master's worker count",
    "stop": "graceful shutdown of a running master",
    "status": "a running master's workers and figures (several running: the list, as ls)",
    "ls": "list this user's running masters: name, pid, workers, generation, uptime, addresses",
    "upgrade": "re-execute a running master in place (SIGUSR2): new balancer code, same pid, listeners and workers",
    "config": "print the effective configuration and where each value came from",
}


class CliParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line and exit code 2, like every other start-up failure."""

    def __init__(self, *args, **kwargs) -> None:
        # No prefix matching: --pid meaning --pid-file by accident would change meaning once another --pid...
        # option came, and a flag of another server must not be taken for a prefix of one of ours.
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"balancer: error: {message} (see {self.prog} --help)\n")


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """One flag per Config field, help taken from the field; only given flags land in the namespace."""
    parser.add_argument("-c", "--config", dest="config_file", default=None, metavar="FILE",
                        help="read options from this TOML file (keys: the long option names); the command line "
                             "and the environment (BALANCER_<OPTION>, WEB_CONCURRENCY) override it "
                             "(default: $BALANCER_CONFIG)")
    parser.add_argument("positional_backend", nargs="?", default=None, metavar="MODULE:ATTR",
                        help="the app to serve, as --backend")
    for f in option_fields():
        meta = f.metadata
        flags = [meta.get("flag") or flag_of(f.name)]
        if f.name in SHORT_FLAGS:
            flags.insert(0, SHORT_FLAGS[f.name])
        default = default_of(f)
        shown = " ".join(default) if isinstance(default, tuple) else default
        # SUPPRESS: a flag not given leaves no attribute, so the environment and the file can supply it.
        kwargs = {"dest": f.name, "help": meta["help"], "default": argparse.SUPPRESS}
        if "default" not in meta["help"] and shown not in ("", None):
            kwargs["help"] += f" (default: {shown})"
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif meta.get("repeat"):
            kwargs.update(action="append", metavar=meta.get("metavar"))
        else:
            kwargs.update(type=type(default), metavar=meta.get("metavar"))
            if meta.get("choices"):
                kwargs.update(choices=meta["choices"], type=str.lower)  # --log-level INFO, as gunicorn takes
        parser.add_argument(*flags, *meta.get("aliases", ()), **kwargs)
    for habit in HABITS:
        parser.add_argument(*habit.flags, action=HabitAction, habit=habit)


class HabitAction(argparse.Action):
    """Another server's flag (balancer/habits.py): one line naming balancer's equivalent, exit 2."""

    def __init__(self, option_strings, dest, habit, **kwargs) -> None:
        # nargs="?": --keep-alive=5 and --keep-alive 5 alike reach the one line, not a complaint about the value.
        super().__init__(option_strings, dest, nargs="?", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        self.habit = habit

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(self.habit.message(option_string))


def build_parser(prog: str = "balancer run") -> argparse.ArgumentParser:
    """The parser of `balancer run` options (also what `balancer OPTIONS` means)."""
    parser = CliParser(prog=prog, description="Master-dispatch load balancer and process supervisor for aiohttp "
                                              "apps. Options come from the command line, then the environment, "
                                              "then the -c file, then the defaults.")
    add_run_options(parser)
    return parser


def build_cli(command: str = "") -> argparse.ArgumentParser:
    """The whole command line: one real subparser per subcommand.

    The control client's options are added only for a control command: running never imports the client.
    """
    top = CliParser(prog="balancer", description="Master-dispatch load balancer and process supervisor for aiohttp "
                                                 "apps. Without a subcommand, `balancer [options] [MODULE:ATTR]` "
                                                 "runs, with the options listed below.")
    top.add_argument("--version", action="version", version=f"balancer {__version__}")
    sub = top.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}", required=True,
                             parser_class=CliParser)
    add_run_options(sub.add_parser("run", help=HELP["run"], description=HELP["run"]))
    for name in CONTROL_COMMANDS:
        parser = sub.add_parser(name, help=HELP[name], description=HELP[name])
        if name == command:
            from balancer.control_client import add_arguments

            add_arguments(parser, name)
    config = sub.add_parser("config", help=HELP["config"], description=HELP["config"])
    add_run_options(config)
    config.add_argument("--json", action="store_true", help="print JSON: {option: {value, source, detail}}")
    return top


def _implicit_run(argv: list[str]) -> list[str]:
    """`balancer --backend x` and `balancer myapp:app` mean `balancer run ...`; so does `balancer app.py`.

    A bare word that is close to a subcommand stays one, so that a typo gets argparse's list of them; another
    module-like word (app, app.py, src/app.py) goes to run as a backend, which says it needs MODULE:ATTR.
    """
    if not argv:
        return ["run"]
    first = argv[0]
    if first in ("-h", "--help", "--version") or first in COMMANDS:
        return argv
    if first.startswith("-") or ":" in first:
        return ["run", *argv]
    if looks_like_module(first) and not difflib.get_close_matches(first, COMMANDS, n=1):
        return ["run", *argv]
    return argv


def resolve_namespace(ns: argparse.Namespace, environ=None) -> tuple[Resolved, dict]:
    """The effective configuration of parsed run options; also the command-line values, for a re-read."""
    environ = os.environ if environ is None else environ
    cli = {f.name: getattr(ns, f.name) for f in option_fields() if hasattr(ns, f.name)}
    cli = {name: tuple(value) if isinstance(value, list) else value for name, value in cli.items()}
    if ns.positional_backend is not None:
        if "backend" in cli and cli["backend"] != ns.positional_backend:
            raise ConfigError(f"two backends given: {ns.positional_backend!r} and --backend {cli['backend']!r}")
        cli["backend"] = ns.positional_backend
    config_file, _ = config_file_of(ns.config_file, environ)
    return resolve(cli, environ, config_file), cli


def parse_config(argv: list[str], environ=None):
    """Parse run options into a validated Config: the command line alone unless an environment is given."""
    return resolve_namespace(build_parser().parse_args(argv), {} if environ is None else environ)[0].config


def print_config(resolved: Resolved, as_json: bool) -> None:
    """Every effective option and its source; the text form is TOML, usable as a -c file."""
    rows = describe(resolved)
    if as_json:
        out = {name: {"value": list(value) if isinstance(value, tuple) else value, "source": origin.source,
                      "detail": origin.detail} for name, value, origin in rows}
        print(json.dumps({"config_file": resolved.config_file, "options": out}, indent=2))
        return
    print(f"# config file: {resolved.config_file or 'none'}")
    for name, value, origin in rows:
        shown = json.dumps(list(value) if isinstance(value, tuple) else value)  # JSON scalars and lists are TOML
        print(f"{name} = {shown}  # {origin}")


def rebuild(cli, environ: dict, config_file: str) -> Config:
    """The Config again from the same command line and start-up environment, and the file as it is now."""
    return resolve(cli, environ, config_file).config


def run(ns: argparse.Namespace) -> int:
    """`balancer run`: resolve the options, then serve until stopped (signals held since balancer/launch.py)."""
    environ = dict(os.environ)  # as at start: a reload re-reads the file, not a changed environment
    try:
        resolved, cli = resolve_namespace(ns, environ)
    except ConfigError as exc:
        print(f"balancer: error: {exc}", file=sys.stderr)
        return 2
    config = resolved.config
    try:
        # --umask and --user first: the log files created now get that mode and, only those, that owner.
        privileges.apply_umask(config)
        run_as = privileges.resolve(config)
        # --log-level/-format/-config, --error-logfile (balancer/logs.py)
        setup_master_logging(config, run_as.owner if run_as is not None else None)
    except (ConfigError, LogSetupError) as exc:
        print(f"balancer: error: {exc}", file=sys.stderr)
        return 2
    from balancer.master import BootError, run_master

    reread = functools.partial(rebuild, cli, environ, resolved.config_file) if resolved.config_file else None
    hold = StartupHold()  # the master releases its info lines once its workers serve
    try:
        return run_master(config, config.loop, reread=reread, startup=hold)
    except ConfigError as exc:
        hold.drop()
        print(f"balancer: error: {exc}", file=sys.stderr)
        return 2
    except BootError as exc:
        hold.drop()
        print(f"balancer: error: worker failed to boot: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130
    finally:
        hold.release()  # stopped before its workers served: what it said still goes out


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `balancer` console script."""
    argv = _implicit_run(list(sys.argv[1:] if argv is None else argv))
    if argv[0] != "run":  # only a master keeps them held (balancer/launch.py) until its loop handles them
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
    if argv[:1] in (["-h"], ["--help"]):  # the subcommands, then run's options: run is what a bare call does
        try:
            print(build_cli().format_help())
            print(build_parser("balancer [run]").format_help(), end="")
            sys.stdout.flush()
        except BrokenPipeError:  # the reader left early (| head): not an error; nothing more to write
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    ns = build_cli(argv[0] if argv else "").parse_args(argv)
    if ns.command in CONTROL_COMMANDS:
        from balancer.control_client import run_command

        return run_command(ns.command, ns)
    if ns.command == "config":
        try:
            resolved, _ = resolve_namespace(ns)
        except ConfigError as exc:
            print(f"balancer: error: {exc}", file=sys.stderr)
            return 2
        try:
            print_config(resolved, ns.json)
            sys.stdout.flush()
        except BrokenPipeError:  # the reader left early (| head): not an error; nothing more to write
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return run(ns)
