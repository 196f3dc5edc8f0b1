"""Log setup for master and workers: text or JSON lines, error and access files, --log-config, reopen on SIGUSR1.

Imported by the workers too (balancer_workers.accesslog), so it imports nothing of the master's world.
"""

from __future__ import annotations

import json
import logging
import logging.config
import os
import sys
from datetime import datetime, timezone

ACCESS_LOGGER = "balancer.access"
# aiohttp's own access logger: routed like ours, so a request line never lands in the error log.
AIOHTTP_ACCESS_LOGGER = "aiohttp.access"
LOG_FORMATS = ("text", "json")
# The combined log format (Apache, nginx, gunicorn's default) plus the request duration in seconds.
DEFAULT_ACCESS_LOG_FORMAT = '%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s" %(L)s'
_RECORD_KEYS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class LogSetupError(ValueError):
    """A log file that cannot be opened or a --log-config that cannot be applied; the text is one line."""


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, pid, role, slot, message, and whatever `extra` added.

    Usable from a --log-config as {"()": "balancer.logs.JsonFormatter"}: role and slot then default to what
    this process is (workers have BALANCER_WORKER_SLOT in their environment).
    """

    def __init__(self, fmt=None, datefmt=None, style="%", validate=True, *, defaults=None,
                 role: str | None = None, slot: int | None = None) -> None:
        super().__init__()  # fmt, datefmt and style are accepted so that dictConfig's "class" form works
        env_slot = os.environ.get("BALANCER_WORKER_SLOT")
        self.role = role or ("worker" if env_slot is not None else "master")
        self.slot = slot if slot is not None or env_slot is None else int(env_slot)

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "role": self.role,
            "slot": self.slot,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():  # extra={...} fields: an access line's request fields
            if key not in _RECORD_KEYS and key not in out:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def text_format(role: str, slot: int | None) -> str:
    """The text line prefix: one timestamp, who wrote it, the level."""
    who = f"balancer {role}" if role in ("master", "zygote") else f"worker slot={slot}"
    return f"%(asctime)s [{who} pid={os.getpid()}] %(levelname)s %(message)s"


def open_handler(target: str, stream) -> logging.Handler:
    """A handler writing to stream for '-', else appending to the file target."""
    if target == "-":
        return logging.StreamHandler(stream)
    try:
        return logging.FileHandler(target, mode="a", encoding="utf-8")
    except OSError as exc:
        raise LogSetupError(f"cannot open log file {target}: {exc.strerror or exc}") from None


def load_log_config(path: str) -> dict:
    """A logging.dictConfig dictionary from a JSON or TOML file (by suffix; otherwise JSON, then TOML)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise LogSetupError(f"cannot read --log-config {path}: {exc.strerror or exc}") from None
    import tomllib

    parsers = {".json": (json.loads,), ".toml": (tomllib.loads,)}.get(os.path.splitext(path)[1].lower(),
                                                                       (json.loads, tomllib.loads))
    errors = []
    for parse in parsers:
        try:
            config = parse(data.decode("utf-8"))
            break
        except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError and TOMLDecodeError are ValueErrors
            errors.append(str(exc))
    else:
        raise LogSetupError(f"bad --log-config {path}: not JSON or TOML: {'; '.join(errors)}")
    if not isinstance(config, dict):
        raise LogSetupError(f"bad --log-config {path}: expected a dictConfig table")
    config.setdefault("version", 1)
    # Loggers made at import (balancer, aiohttp) keep working unless the file names them.
    config.setdefault("disable_existing_loggers", False)
    return config


def configure(role: str, slot: int | None, *, level: str = "info", log_format: str = "text",
              error_logfile: str = "-", access_logfile: str = "", log_config: str = "") -> None:
    """Set up this process's logging: errors to error_logfile, access lines to access_logfile ('' = none).

    Access lines have their own logger with its own handler and level, so --log-level never hides them, and
    their text is the access format alone: its %(t)s is the line's one timestamp.
    """
    as_json = log_format == "json"

    def formatter(text: str) -> logging.Formatter:
        return JsonFormatter(role=role, slot=slot) if as_json else logging.Formatter(text)

    root = logging.getLogger()
    error_handler = open_handler(error_logfile, sys.stderr)
    error_handler.setFormatter(formatter(text_format(role, slot)))
    _replace_handlers(root, error_handler)
    root.setLevel(level.upper())
    access_handler = None
    if access_logfile:
        access_handler = open_handler(access_logfile, sys.stdout)
        access_handler.setFormatter(formatter("%(message)s"))
    for name in (ACCESS_LOGGER, AIOHTTP_ACCESS_LOGGER):
        logger = logging.getLogger(name)
        logger.propagate = False
        logger.setLevel(logging.INFO)
        _replace_handlers(logger, access_handler)
    if log_config:
        try:
            logging.config.dictConfig(load_log_config(log_config))
        except LogSetupError:
            raise
        except (ValueError, TypeError, AttributeError, ImportError) as exc:
            raise LogSetupError(f"bad --log-config {log_config}: {_one_line(exc)}") from None


def _replace_handlers(logger: logging.Logger, handler: logging.Handler | None) -> None:
    """Give logger this one handler (or none), closing the ones it had."""
    for old in logger.handlers[:]:
        logger.removeHandler(old)
        old.close()
    if handler is not None:
        logger.addHandler(handler)


def _one_line(exc: BaseException) -> str:
    """An exception as one line, with the causes dictConfig chains to it."""
    parts = []
    while exc is not None and len(parts) < 4:
        parts.append(str(exc))
        exc = exc.__cause__
    return ": ".join(p for p in parts if p).replace("\n", " ")


def all_handlers() -> list[logging.Handler]:
    """Every handler of this process's loggers (ours and --log-config's), each once."""
    handlers = {id(h): h for h in logging.getLogger().handlers}
    for logger in list(logging.Logger.manager.loggerDict.values()):
        if isinstance(logger, logging.Logger):
            handlers.update((id(h), h) for h in logger.handlers)
    return list(handlers.values())


def file_handlers() -> list[logging.FileHandler]:
    """Every handler of this process's loggers that writes a file (ours and --log-config's)."""
    return [h for h in all_handlers() if isinstance(h, logging.FileHandler)]


class StartupHold(logging.Filter):
    """Holds the master's info lines back until its first workers serve; dropped if start-up fails.

    A start-up failure (a backend that raises at import, a privilege drop refused) is one line on stderr:
    without the hold it came after "metrics on ...", "control socket at ..." and a line per worker stopped.
    Info, warning and error lines are held; debug lines (asked for, to watch the start) and critical ones
    never are. A start that succeeds writes what was held, late but in order with its own timestamps.
    """

    def __init__(self) -> None:
        super().__init__()
        self.held: list[logging.LogRecord] = []
        self.handlers = all_handlers()
        for handler in self.handlers:
            handler.addFilter(self)

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep info, warning and error records for later; let the rest through."""
        if logging.INFO <= record.levelno < logging.CRITICAL:
            self.held.append(record)
            return False
        return True

    def release(self) -> None:
        """Write what was held, in order and with its own timestamps; from now on nothing is held."""
        self._remove()
        held, self.held = self.held, []
        for record in held:
            logging.getLogger(record.name).handle(record)

    def drop(self) -> None:
        """Start-up failed: forget what was held; the caller prints the one error line."""
        self._remove()
        self.held = []

    def _remove(self) -> None:
        for handler in self.handlers:
            handler.removeFilter(self)
        self.handlers = []


def log_file_paths(config) -> list[str]:
    """The files the master and its workers append to: the master's open ones and the access log."""
    paths = {handler.baseFilename for handler in file_handlers()}
    access = access_target(config.access_log, config.access_logfile)
    if access not in ("", "-"):
        paths.add(os.path.abspath(access))
    return sorted(paths)


def reopen_log_files() -> int:
    """Reopen every file a logging handler of this process writes (after logrotate moved it); how many."""
    handlers = file_handlers()
    for handler in handlers:
        stream = handler._open()  # the path as configured: a new file if it was moved; opened first, so a
        handler.acquire()  # failure (OSError) leaves the old stream writing
        try:
            old, handler.stream = handler.stream, stream
        finally:
            handler.release()
        if old is not None:
            old.close()
    return len(handlers)


def access_target(access_log: bool, access_logfile: str) -> str:
    """Where access lines go: --access-logfile, or stdout for --access-log alone; '' when off."""
    return access_logfile or ("-" if access_log else "")


def setup_master_logging(config) -> None:
    """The master's logging from its Config; LogSetupError (one line) when a file or --log-config fails."""
    access = access_target(config.access_log, config.access_logfile)
    if access not in ("", "-"):  # the workers write it: an unwritable path stops start-up here, once
        open_handler(access, sys.stdout).close()
    configure("master", None, level=config.log_level, log_format=config.log_format,
              error_logfile=config.error_logfile, access_logfile="", log_config=config.log_config)
