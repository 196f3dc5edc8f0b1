"""Where each option comes from: defaults, then a TOML file, then the environment, then the command line."""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import MISSING, dataclass, replace
from typing import Mapping

from balancer import cpus
from balancer.config import Config, ConfigError, option_fields, reloadable_options

ENV_PREFIX = "BALANCER_"
CONFIG_ENV = "BALANCER_CONFIG"  # the file, when -c/--config is not given
CONCURRENCY_ENV = "WEB_CONCURRENCY"  # the worker count gunicorn, uvicorn and Heroku-style platforms set
TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")


@dataclass(frozen=True)
class Origin:
    """Where one option's effective value came from: a source and, for file/env/cli, the name it was given as."""

    source: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.source} {self.detail}" if self.detail else self.source


@dataclass(frozen=True)
class Resolved:
    """A validated Config, where each of its options came from, and the file read (empty when none)."""

    config: Config
    origins: dict[str, Origin]
    config_file: str


def flag_of(name: str) -> str:
    """The long command-line flag of a Config field."""
    return "--" + name.replace("_", "-")


def default_of(f):
    """A field's default value, whether given directly or by factory."""
    return f.default_factory() if f.default is MISSING else f.default


def _kind(f) -> type:
    """bool, int, float, str or tuple: what values a field takes, read off its default."""
    return type(default_of(f))


def from_text(f, text: str, where: str):
    """An environment string as the field's type; ConfigError naming where it came from."""
    kind = _kind(f)
    if kind is bool:
        if text.strip().lower() in TRUE:
            return True
        if text.strip().lower() in FALSE:
            return False
        raise ConfigError(f"bad {where} {text!r}: expected one of 1/0, true/false, yes/no")
    if kind is tuple:  # repeatable options: a comma- or space-separated list
        items = tuple(item for item in re.split(r"[,\s]+", text) if item)
        return items
    if kind in (int, float):
        try:
            return kind(text.strip())
        except ValueError:
            raise ConfigError(f"bad {where} {text!r}: expected {'an integer' if kind is int else 'a number'}") \
                from None
    return chosen(f, text)


def chosen(f, text: str) -> str:
    """A value of a field with choices in lower case (INFO is info, as the command line takes it); others as is."""
    return text.lower() if f.metadata.get("choices") else text


def from_toml(f, value, where: str):
    """A TOML value checked against the field's type; ConfigError naming where it came from."""
    kind = _kind(f)
    if kind is tuple:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return tuple(value)
        raise ConfigError(f"bad {where} {value!r}: expected a string or a list of strings")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
        return chosen(f, value) if kind is str else value
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    raise ConfigError(f"bad {where} {value!r}: expected {names[kind]}")


def env_values(environ: Mapping[str, str]) -> dict[str, tuple[object, Origin]]:
    """Options set in the environment: BALANCER_<FIELD> for every field, WEB_CONCURRENCY for workers."""
    out: dict[str, tuple[object, Origin]] = {}
    by_name = {f.name: f for f in option_fields()}
    if environ.get(CONCURRENCY_ENV, "").strip():
        out["workers"] = (from_text(by_name["workers"], environ[CONCURRENCY_ENV], CONCURRENCY_ENV),
                          Origin("env", CONCURRENCY_ENV))
    for name, f in by_name.items():
        var = ENV_PREFIX + name.upper()
        if var in environ:  # BALANCER_WORKERS wins over WEB_CONCURRENCY: it is ours and more specific
            out[name] = (from_text(f, environ[var], var), Origin("env", var))
    return out


def file_values(path: str) -> dict[str, tuple[object, Origin]]:
    """Options in a TOML file: keys are the field names, with - or _; unknown keys and bad types are errors."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        if path.endswith(".py"):  # gunicorn -c gunicorn.conf.py
            raise ConfigError(f"bad config file {path}: balancer reads TOML (keys: the long option names, e.g. "
                              "workers = 4), not a Python file as gunicorn does") from None
        raise ConfigError(f"bad config file {path}: {exc}") from None
    by_name = {f.name: f for f in option_fields()}
    out: dict[str, tuple[object, Origin]] = {}
    keys: dict[str, str] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in by_name:
            raise ConfigError(f"unknown option {key!r} in {path}")
        if name in keys:  # max_requests and max-requests: which one was meant is not ours to guess
            raise ConfigError(f"option {name} is set twice in {path}, as {keys[name]!r} and {key!r}")
        keys[name] = key
        out[name] = (from_toml(by_name[name], value, f"{key} in {path}"), Origin("file", path))
    return out


def default_origins() -> dict[str, Origin]:
    """Origins of the defaults; the worker count says what it was worked out from."""
    origins = {f.name: Origin("default") for f in option_fields()}
    quota = cpus.cgroup_cpu_quota()
    origins["workers"] = Origin("default", f"(CPUs this process may use: {cpus.affinity_cpus()} in its affinity "
                                           f"mask, cgroup quota {'none' if quota is None else f'{quota:g}'})")
    return origins


def config_file_of(cli_file: str | None, environ: Mapping[str, str]) -> tuple[str, Origin | None]:
    """The config file to read: -c/--config, else $BALANCER_CONFIG; made absolute so a re-read finds it."""
    if cli_file:
        return os.path.abspath(cli_file), Origin("cli", "--config")
    if environ.get(CONFIG_ENV):
        return os.path.abspath(environ[CONFIG_ENV]), Origin("env", CONFIG_ENV)
    return "", None


def resolve(cli: Mapping[str, object], environ: Mapping[str, str], config_file: str = "") -> Resolved:
    """Layer defaults < file < environment < command line into one validated Config."""
    values: dict[str, object] = {}
    origins = default_origins()
    layers = [file_values(config_file) if config_file else {}, env_values(environ),
              {name: (value, Origin("cli", flag_of(name))) for name, value in cli.items()}]
    for layer in layers:
        for name, (value, origin) in layer.items():
            values[name] = value
            origins[name] = origin
    try:
        config = Config(**values)
    except ConfigError as exc:
        raise ConfigError(with_origin(str(exc), origins)) from None
    return Resolved(config, origins, config_file)


def with_origin(message: str, origins: Mapping[str, Origin]) -> str:
    """A validation message naming --option, plus where the value came from when not the command line."""
    m = re.search(r"--([a-z][a-z-]*)", message)
    origin = origins.get(m.group(1).replace("-", "_")) if m else None
    if origin is None or origin.source in ("default", "cli"):
        return message
    return f"{message} (from {origin})"


def describe(resolved: Resolved) -> list[tuple[str, object, Origin]]:
    """(name, value, origin) for every option, in declaration order."""
    return [(f.name, getattr(resolved.config, f.name), resolved.origins[f.name]) for f in option_fields()]


def merge_reload(old: Config, new: Config) -> tuple[Config, list[str], list[str]]:
    """The config a reload runs with: old plus new's reloadable changes; (config, applied, kept) option names."""
    changed = [f.name for f in option_fields() if getattr(old, f.name) != getattr(new, f.name)]
    reloadable = reloadable_options(old)
    applied = [name for name in changed if name in reloadable]
    kept = [name for name in changed if name not in reloadable]
    return replace(old, **{name: getattr(new, name) for name in applied}), applied, kept
