"""Command line: `balancer [run] [options]`, generated from Config, plus control subcommands."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import MISSING

from balancer import __version__
from balancer.config import Config, ConfigError, option_fields

COMMANDS = ("run", "reload", "scale", "stop", "status")


def _default(f):
    """A field's default value, whether given directly or by factory."""
    return f.default_factory() if f.default is MISSING else f.default


def build_parser() -> argparse.ArgumentParser:
    """An argparse parser with one flag per Config field, help and defaults taken from the field."""
    parser = argparse.ArgumentParser(
        prog="balancer",
        description="Master-dispatch load balancer and process supervisor for aiohttp apps. "
                    "Subcommands: run (default), reload, scale N, stop, status.",
    )
    parser.add_argument("--version", action="version", version=f"balancer {__version__}")
    for f in option_fields():
        meta = f.metadata
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        default = _default(f)
        shown = " ".join(default) if isinstance(default, tuple) else default
        kwargs = {"dest": f.name, "help": meta["help"]}
        if "default" not in meta["help"] and shown not in ("", None):
            kwargs["help"] += f" (default: {shown})"
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
            kwargs["default"] = default
        elif meta.get("repeat"):
            kwargs.update(action="append", default=None, metavar=meta.get("metavar"))
        else:
            kwargs.update(type=type(default), default=default, metavar=meta.get("metavar"))
            if meta.get("choices"):
                kwargs["choices"] = meta["choices"]
        parser.add_argument(flag, **kwargs)
    return parser


def parse_config(argv: list[str]) -> Config:
    """Parse run options into a validated Config (ConfigError on a bad value)."""
    ns = build_parser().parse_args(argv)
    values = {}
    for f in option_fields():
        value = getattr(ns, f.name)
        if value is None:
            continue
        values[f.name] = tuple(value) if isinstance(value, list) else value
    return Config(**values)


def setup_logging(level: str) -> None:
    """Master log lines go to stderr with the master's pid."""
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format=f"%(asctime)s [balancer master pid={os.getpid()}] %(levelname)s %(message)s")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `balancer` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "run"
    if command != "run":
        from balancer.control import client_main

        return client_main(command, argv)
    try:
        config = parse_config(argv)
    except ConfigError as exc:
        print(f"balancer: error: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_level)
    from balancer.master import BootError, run_master

    try:
        return run_master(config, config.loop)
    except ConfigError as exc:
        print(f"balancer: error: {exc}", file=sys.stderr)
        return 2
    except BootError as exc:
        print(f"balancer: error: worker failed to boot: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130
