"""Log setup for master and workers: text or JSON lines, error and access files, --log-config, reopen on SIGUSR1.

Imported by the workers too (balancer_workers.accesslog), so it imports nothing of the master's world.
"""

from __future__ import annotations

import errno
import json
import logging
import logging.config
import os
import stat
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
    """The text line prefix: one timestamp, who wrote it, the level; then the logger (not balancer's own)."""
    who = f"balancer {role}" if role in ("master", "zygote") else f"worker slot={slot}"
    return f"%(asctime)s [{who} pid={os.getpid()}] %(levelname)s %(origin)s%(message)s"


class TextFormatter(logging.Formatter):
    """Text lines; a record of any logger but balancer's own (the app's, aiohttp's) is named: `myapp.db: ...`."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        name = record.name
        origin = "" if name == "balancer" or name.startswith("balancer.") else f"{name}: "
        return self._fmt % {**record.__dict__, "origin": origin}  # the record itself stays as it was


def open_log_fd(path: str, owner: tuple[int, int] | None = None) -> int:
    """An fd appending to the log file path, created if missing: never through a symlink, only a regular file.

    Log files often sit in a directory the service user owns (/var/log/app), where that user can plant a
    symlink to any file root may write, or a FIFO that blocks the master's open: O_NOFOLLOW refuses the
    first, O_NONBLOCK and the type check the second. Only a file this call creates is given to owner
    (--user): one found there may be another file hard-linked in. OSError with a one-line strerror.
    """
    flags = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o666)
            created = True
        except FileExistsError:
            fd = os.open(path, flags)
            created = False
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(exc.errno, "it is a symbolic link, which balancer does not follow: name the file "
                                     "itself", path) from None
        if exc.errno == errno.ENXIO:  # a FIFO nobody reads
            raise OSError(exc.errno, "not a regular file", path) from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        os.set_blocking(fd, True)
        if created and owner is not None:
            os.fchown(fd, *owner)
    except BaseException:
        os.close(fd)
        raise
    return fd


class LogFileHandler(logging.FileHandler):
    """A FileHandler whose file is opened, and reopened on SIGUSR1, by open_log_fd."""

    def __init__(self, path: str, owner: tuple[int, int] | None = None) -> None:
        self.owner = owner  # who gets the file if this handler creates it (--user, set up as root)
        super().__init__(path, mode="a", encoding="utf-8")

    def _open(self):
        return open(open_log_fd(self.baseFilename, self.owner), "a", encoding=self.encoding, errors=self.errors)


# Log targets that mean this process's own streams, as "-" does: /dev/stdout is a symlink (to /proc/self/fd/1,
# then a pipe or a tty), which a log file is never opened through.
STREAMS = {"/dev/stdout": "stdout", "/dev/stderr": "stderr"}


def open_handler(target: str, stream, owner: tuple[int, int] | None = None) -> logging.Handler:
    """A handler writing to stream for '-', to our stdout or stderr for /dev/std*, else appending to target."""
    if target == "-" or target in STREAMS:
        return logging.StreamHandler(getattr(sys, STREAMS[target]) if target in STREAMS else stream)
    try:
        return LogFileHandler(target, owner)
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
              error_logfile: str = "-", access_logfile: str = "", log_config: str = "",
              owner: tuple[int, int] | None = None) -> None:
    """Set up this process's logging: errors to error_logfile, access lines to access_logfile ('' = none).

    Access lines have their own logger with its own handler and level, so --log-level never hides them, and
    their text is the access format alone: its %(t)s is the line's one timestamp. owner: who gets the log
    files this creates (the master, as root, for --user).
    """
    as_json = log_format == "json"

    def formatter(text: str, cls=TextFormatter) -> logging.Formatter:
        return JsonFormatter(role=role, slot=slot) if as_json else cls(text)

    root = logging.getLogger()
    error_handler = open_handler(error_logfile, sys.stderr, owner)
    error_handler.setFormatter(formatter(text_format(role, slot)))
    _replace_handlers(root, error_handler)
    root.setLevel(level.upper())
    access_handler = None
    if access_logfile:
        access_handler = open_handler(access_logfile, sys.stdout, owner)
        access_handler.setFormatter(formatter("%(message)s", logging.Formatter))
    for name in (ACCESS_LOGGER, AIOHTTP_ACCESS_LOGGER):
        logger = logging.getLogger(name)
        logger.propagate = False
        logger.setLevel(logging.INFO)
        _replace_handlers(logger, access_handler)
    if log_config:
        config = load_log_config(log_config)
        absent = {path for path in _handler_files(config) if not os.path.lexists(path)}
        try:
            logging.config.dictConfig(config)
        except (ValueError, TypeError, AttributeError, ImportError) as exc:
            raise LogSetupError(f"bad --log-config {log_config}: {_one_line(exc)}") from None
        if owner is not None:
            for handler in file_handlers():
                if handler.baseFilename in absent:
                    _give_if_created(handler, owner)


def _handler_files(config: dict) -> list[str]:
    """The files a dictConfig's handlers name (their `filename`), as absolute paths."""
    handlers = config.get("handlers")
    return [os.path.abspath(spec["filename"]) for spec in (handlers.values() if isinstance(handlers, dict) else ())
            if isinstance(spec, dict) and isinstance(spec.get("filename"), str)]


def _give_if_created(handler: logging.FileHandler, owner: tuple[int, int]) -> None:
    """Give owner a --log-config file that was missing before its handler opened it: the one the handler made.

    The standard library's handlers open by path: the open file must be what the path names now (not a
    symlink planted meanwhile) and have no other name (not a hard link to another file), or it stays as is.
    """
    stream = getattr(handler, "stream", None)
    if stream is None:  # delay=True: the worker creates it, as the user, on the first line
        return
    try:
        opened, named = os.fstat(stream.fileno()), os.lstat(handler.baseFilename)
        if (opened.st_dev, opened.st_ino) == (named.st_dev, named.st_ino) and opened.st_nlink == 1 \
                and stat.S_ISREG(opened.st_mode):
            os.fchown(stream.fileno(), *owner)
    except OSError:  # gone or renamed meanwhile: the check as the user (balancer/privileges.py) names it
        pass


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


def log_files(config) -> list[tuple[str, str]]:
    """(option, path) of each file the master and its workers append to, --log-config's handlers' too."""
    out = [(option, os.path.abspath(target)) for option, target in
           (("--error-logfile", config.error_logfile),
            ("--access-logfile", access_target(config.access_log, config.access_logfile)))
           if target not in ("", "-") and target not in STREAMS]
    ours = {path for _, path in out}
    out += sorted(("--log-config", handler.baseFilename) for handler in file_handlers()
                  if handler.baseFilename not in ours)
    return out


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


def setup_master_logging(config, owner: tuple[int, int] | None = None) -> None:
    """The master's logging from its Config; LogSetupError (one line) when a file or --log-config fails.

    owner: with --user, set up as root: the log files created now are given to that user, whose workers
    (and the master itself, after SIGUSR1) open them again.
    """
    access = access_target(config.access_log, config.access_logfile)
    if access not in ("", "-"):  # the workers write it: an unwritable path stops start-up here, once
        open_handler(access, sys.stdout, owner).close()
    configure("master", None, level=config.log_level, log_format=config.log_format,
              error_logfile=config.error_logfile, access_logfile="", log_config=config.log_config, owner=owner)
