"""The worker's access log (gunicorn's format atoms, compiled once) and the worker's log setup."""

from __future__ import annotations

import base64
import binascii
import logging
import os
import signal
import sys
import time

from balancer import logs
from balancer.accessformat import tokens

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def clean(value: str) -> str:
    """A client-supplied value made safe for a log line: quotes, backslashes and control characters escaped."""
    if value.isprintable() and '"' not in value and "\\" not in value:
        return value
    return value.encode("unicode_escape").decode("ascii").replace('"', '\\"')


def remote(request) -> str:
    """The client: its address (forwarded, when trusted), else the unix socket it came in on."""
    address = request.remote
    if address:
        return address
    transport = request.transport  # a unix-socket peer has no address: name the socket instead
    path = transport.get_extra_info("sockname") if transport is not None else None
    return f"unix:{path}" if isinstance(path, str) and path else "unix"


def body_bytes(request, response) -> int:
    """Bytes of the response body: its Content-Length, else (streamed) what aiohttp wrote."""
    if request.method == "HEAD":
        return 0
    length = response.content_length
    return length if length is not None else response.body_length


def protocol(request) -> str:
    """'HTTP/1.1'."""
    version = request.version
    return f"HTTP/{version.major}.{version.minor}"


def _user(request) -> str:
    """The user name of Basic authentication, else '-'."""
    auth = request.headers.get("Authorization")
    if not auth or auth[:6].lower() != "basic ":
        return "-"
    try:
        user = base64.b64decode(auth[6:].strip(), validate=True).decode("utf-8", "replace").partition(":")[0]
    except (binascii.Error, ValueError):
        return "-"
    return clean(user) if user else "-"


class _RequestClock:
    """%(t)s: when the request started, as [10/Oct/2000:13:55:36 -0700], formatted once per second."""

    def __init__(self) -> None:
        self.second = -1
        self.text = ""

    def __call__(self, request, response, elapsed) -> str:
        second = int(time.time() - elapsed)
        if second != self.second:
            tm = time.localtime(second)  # month names fixed: a backend's setlocale() must not change them
            offset = tm.tm_gmtoff // 60
            sign = "-" if offset < 0 else "+"
            self.text = (f"[{tm.tm_mday:02d}/{_MONTHS[tm.tm_mon - 1]}/{tm.tm_year}:{tm.tm_hour:02d}:"
                         f"{tm.tm_min:02d}:{tm.tm_sec:02d} {sign}{abs(offset) // 60:02d}{abs(offset) % 60:02d}]")
            self.second = second
        return self.text


# Each getter takes (request, response, elapsed seconds) and returns the atom's text.
GETTERS = {
    "h": lambda rq, rs, t: remote(rq),
    "u": lambda rq, rs, t: _user(rq),
    "r": lambda rq, rs, t: clean(f"{rq.method} {rq.raw_path} {protocol(rq)}"),
    "m": lambda rq, rs, t: rq.method,
    "U": lambda rq, rs, t: clean(rq.raw_path.partition("?")[0]),
    "q": lambda rq, rs, t: clean(rq.raw_path.partition("?")[2]),
    "H": lambda rq, rs, t: protocol(rq),
    "s": lambda rq, rs, t: str(rs.status),
    "B": lambda rq, rs, t: str(body_bytes(rq, rs)),
    "b": lambda rq, rs, t: str(body_bytes(rq, rs) or "-"),
    "f": lambda rq, rs, t: clean(rq.headers.get("Referer", "-")),
    "a": lambda rq, rs, t: clean(rq.headers.get("User-Agent", "-")),
    "T": lambda rq, rs, t: str(int(t)),
    "M": lambda rq, rs, t: str(int(t * 1000)),
    "D": lambda rq, rs, t: str(int(t * 1_000_000)),
    "L": lambda rq, rs, t: f"{t:.6f}",
}


def _header_getter(name: str, outgoing: bool):
    """%({name}i)s from the request's headers, %({name}o)s from the response's; '-' when absent."""
    if outgoing:
        return lambda rq, rs, t: clean(rs.headers.get(name, "-"))
    return lambda rq, rs, t: clean(rq.headers.get(name, "-"))


def compile_format(fmt: str) -> tuple[str, tuple]:
    """A %-template with one %s per dynamic atom, and the getters filling them, in order.

    Atoms that cannot change while the worker lives (l, p, {VAR}e) and unknown ones ('-', as gunicorn
    renders them) go into the template as text, so a line costs one call per dynamic atom and one %.
    """
    template, getters, pos = [], [], 0
    for m in tokens(fmt):  # balancer.accessformat.AccessFormatError at a lone '%'
        template.append(fmt[pos:m.start()])
        pos = m.end()
        atom = m.group(1)
        if atom is None:  # %%
            template.append("%%")
            continue
        static = None
        if atom[0] == "{":
            name, kind = atom[1:-2], atom[-1]
            if kind == "e":
                static = os.environ.get(name, "-")
            else:
                getters.append(_header_getter(name, kind == "o"))
        elif atom == "t":
            getters.append(_RequestClock())
        elif atom == "p":
            static = f"<{os.getpid()}>"
        elif atom in GETTERS:
            getters.append(GETTERS[atom])
        else:  # l (the RFC 1413 identity nobody serves) and atoms gunicorn does not know
            static = "-"
        template.append("%s" if static is None else static.replace("%", "%%"))
    template.append(fmt[pos:])
    return "".join(template), tuple(getters)


class AccessLog:
    """Renders and emits one access line per response, in text (the format) or JSON (the request's fields)."""

    def __init__(self, fmt: str, logger: logging.Logger, as_json: bool = False) -> None:
        self.template, self.getters = compile_format(fmt)
        self.logger = logger
        self.as_json = as_json

    @classmethod
    def from_settings(cls, settings: dict) -> "AccessLog | None":
        """The worker's access log, or None when access logging is off."""
        if not logs.access_target(settings.get("access_log", False), settings.get("access_logfile", "")):
            return None
        return cls(settings.get("access_log_format") or logs.DEFAULT_ACCESS_LOG_FORMAT,
                   logging.getLogger(logs.ACCESS_LOGGER), settings.get("log_format") == "json")

    def render(self, request, response, elapsed: float) -> str:
        """The text line for one response."""
        return self.template % tuple([get(request, response, elapsed) for get in self.getters])

    def fields(self, request, response, elapsed: float) -> dict:
        """The request's fields for a JSON line (json escapes them; no clean() needed)."""
        path, _, query = request.raw_path.partition("?")
        headers = request.headers
        return {"remote": remote(request), "method": request.method, "path": path, "query": query,
                "protocol": protocol(request), "status": response.status, "bytes": body_bytes(request, response),
                "referer": headers.get("Referer"), "user_agent": headers.get("User-Agent"),
                "duration": round(elapsed, 6)}

    def log(self, request, response, elapsed: float) -> None:
        """Emit the line for one response; a logging failure must not cost the request."""
        logger = self.logger
        if not logger.isEnabledFor(logging.INFO):  # a --log-config may have turned it down
            return
        try:
            if self.as_json:
                extra = self.fields(request, response, elapsed)
                line = f"{extra['method']} {request.raw_path} {extra['protocol']} {extra['status']}"
            else:
                extra = None
                line = self.render(request, response, elapsed)
            # makeRecord and handle, not info(): info() looks up its caller's frame and file for every line,
            # a third of the cost of logging one, for a record whose origin is always this line.
            logger.handle(logger.makeRecord(logger.name, logging.INFO, __file__, 0, line, None, None, extra=extra))
        except Exception:
            logging.getLogger("balancer.worker").exception("access log line failed")


def setup_worker_logging(settings: dict) -> None:
    """This worker's logging, as the master's options say (raises logs.LogSetupError)."""
    logs.configure("worker", settings["slot"], level=settings.get("log_level", "info"),
                   log_format=settings.get("log_format", "text"), error_logfile=settings.get("error_logfile") or "-",
                   access_logfile=logs.access_target(settings.get("access_log", False),
                                                     settings.get("access_logfile", "")),
                   log_config=settings.get("log_config", ""))


def reopen_on_sigusr1(loop) -> None:
    """From now on SIGUSR1 (the master forwards logrotate's) reopens this worker's log files."""
    loop.add_signal_handler(signal.SIGUSR1, reopen_logs)


def reopen_logs() -> None:
    """Reopen the log files; runs in the event loop, not in the signal handler."""
    try:
        count = logs.reopen_log_files()
    except OSError as exc:  # the directory went away: keep serving, say so on stderr
        print(f"balancer worker: reopening log files failed: {exc}", file=sys.stderr)
        return
    logging.getLogger("balancer.worker").debug("SIGUSR1: log files reopened (%d)", count)
