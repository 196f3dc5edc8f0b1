"""One frozen, validated dataclass: the single source of option defaults and CLI help."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields

from balancer.accessformat import AccessFormatError, check_format
from balancer.cpus import available_cpus
from balancer.eventloop import LOOPS, LoopUnavailable, loop_factory
from balancer.habits import backend_hint
from balancer.logs import DEFAULT_ACCESS_LOG_FORMAT, LOG_FORMATS, LogSetupError, load_log_config
from balancer.trusted import parse_allow_ips

DEFAULT_BACKEND = "balancer_workers.examples.hello:handler"
# 9100 is node_exporter and 9090 Prometheus; 9359 is free in the exporter port registry.
DEFAULT_METRICS_BIND = "127.0.0.1:9359"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
# Accept coalescing: a worker with this many connections open has work queued for longer than the wait,
# so holding new connections in the backlog for --accept-coalesce does not leave it idle.
COALESCE_BUSY = 8
MAX_COALESCE = 0.05  # past this the wait is a latency the batching does not repay
# One worker per CPU this process may use, not per CPU the machine has: a pod limited to 2 CPUs on a 64-core
# node would otherwise start 64 workers that the CFS quota throttles in turn.
DEFAULT_WORKERS = available_cpus()
# An async worker per CPU keeps the CPUs busy; more help only handlers that block their loop (sync drivers, CPU
# work), where gunicorn's rule for blocking workers is 2-4 per core. Past 8 per CPU they only take turns on the
# CPUs, each with its own memory, and a typo (`scale 200`) could fork hundreds: --workers, the config file,
# SIGTTIN and `balancer scale` all stop here. It follows the same count as the default (affinity, cgroup quota).
WORKERS_PER_CPU = 8
MAX_WORKERS = WORKERS_PER_CPU * DEFAULT_WORKERS


class ConfigError(ValueError):
    """An option value that cannot work."""


def parse_octal(text: str, option: str) -> int | None:
    """Permission bits written in octal ("0660", "027", "0o660"); None when the option was not given."""
    if not text:
        return None
    digits = text[2:] if text[:2].lower() == "0o" else text
    if not re.fullmatch(r"[0-7]{1,4}", digits) or int(digits, 8) > 0o777:
        raise ConfigError(f"bad {option} {text!r}: expected octal permission bits between 0 and 0777, e.g. 0660")
    return int(digits, 8)


def opt(default, help: str, *, metavar: str | None = None, repeat: bool = False, choices=None, flag=None,
        aliases: tuple[str, ...] = ()):
    """Declare a Config field together with what its CLI flag needs (choices are case-insensitive)."""
    meta = {"help": help, "metavar": metavar, "repeat": repeat, "choices": choices, "flag": flag, "aliases": aliases}
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: tuple(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Bind:
    """A parsed listen address: tcp (host, port) or a unix path."""

    family: str  # "tcp" or "unix"
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.family == "unix":
            return f"unix:{self.path}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_bind(text: str) -> Bind:
    """Parse HOST:PORT, [V6]:PORT, :PORT or unix:/path."""
    if text.startswith("unix:"):
        path = text[5:]
        if not path:
            raise ConfigError(f"bad bind {text!r}: unix: needs a path")
        return Bind("unix", path=path)
    m = re.fullmatch(r"\[([0-9A-Fa-f:.%a-zA-Z]+)\]:(\d+)|([^:\[\]]*):(\d+)", text)
    if not m:
        raise ConfigError(f"bad bind {text!r}: expected HOST:PORT, [IPV6]:PORT or unix:/path")
    host = m.group(1) if m.group(1) is not None else (m.group(3) or "0.0.0.0")
    port = int(m.group(2) or m.group(4))
    if not 0 <= port <= 65535:
        raise ConfigError(f"bad bind {text!r}: port {port} out of range")
    return Bind("tcp", host=host, port=port)


@dataclass(frozen=True)
class Config:
    """Everything the master and its workers are told; validated once, never mutated."""

    backend: str = opt(DEFAULT_BACKEND, "the app to serve, module:attr (handler, Application or factory)",
                       metavar="MODULE:ATTR")
    app_dir: str = opt("", "directory put first on the workers' import path (default: current directory)",
                       metavar="DIR")
    reload: bool = opt(False, "development: watch --app-dir for changed Python files and run a rolling reload "
                       "on each change (needs the reload extra: watchfiles)")
    preload: bool = opt(False, "import the backend's module once per code generation in a zygote process that "
                        "forks the workers: memory shared copy-on-write, workers ready in milliseconds; a reload "
                        "(SIGHUP) starts a new zygote on the code on disk; the master still never imports it")
    bind: tuple[str, ...] = opt(("127.0.0.1:8000",), "listen address; repeatable: HOST:PORT, [::1]:PORT, unix:/path",
                                metavar="ADDR", repeat=True)
    workers: int = opt(DEFAULT_WORKERS, "number of worker processes (default: the CPUs this process may use: "
                       "its affinity mask (taskset, cpuset), capped by its cgroup's CPU quota (cpu.max) rounded up, "
                       f"at least 1; here {DEFAULT_WORKERS})", metavar="N")
    worker_connections: int = opt(1000, "open connections per worker before the master stops giving it more",
                                  metavar="N")
    backlog: int = opt(2048, "listen backlog: where connections wait while every worker is at its cap", metavar="N")
    accept_coalesce: float = opt(0.001, "seconds the master waits to accept again while every worker has "
                                 f"{COALESCE_BUSY}+ connections open, so they go out in bigger batches (0: never)",
                                 metavar="SECONDS")
    dispatch_hold: bool = opt(True, "while every worker is busy with CPU-bound requests (0.25 ms of CPU or more "
                              "each), keep a new connection in the master until one is free, as a central queue "
                              "(never longer than it would wait at the least-loaded worker); off: give it to the "
                              "least-loaded at once")
    keepalive_rebalance: bool = opt(True, "give an idle keep-alive connection back to the master between requests "
                                    "while its worker has another request in hand and another worker is free, "
                                    "when requests cost 0.25 ms of CPU or more each, so that its next request goes "
                                    "to a free worker; never TLS connections; off: a connection stays on its worker")
    # 25: graceful timeout + shutdown delay + KILL_GRACE (2 s) fits Kubernetes' 30 s terminationGracePeriodSeconds.
    graceful_timeout: float = opt(25.0, "seconds a draining worker gets to finish in-flight requests; this plus "
                                  "--shutdown-delay plus 2 s must fit the wait before SIGKILL (Kubernetes: 30 s "
                                  "unless terminationGracePeriodSeconds says otherwise)", metavar="SECONDS")
    shutdown_delay: float = opt(0.0, "seconds to keep accepting and serving after SIGTERM, SIGINT or `balancer stop` "
                                "while /readyz answers 503, so load balancers stop routing here before the drain "
                                "starts (0: drain at once)", metavar="SECONDS")
    timeout: float = opt(30.0, "seconds without a heartbeat from a worker's event loop before it is killed",
                         metavar="SECONDS")
    boot_timeout: float = opt(30.0, "seconds a new worker gets to load the backend and report ready",
                              metavar="SECONDS")
    keepalive_timeout: float = opt(5.0, "seconds an idle keep-alive connection is kept open", metavar="SECONDS")
    header_timeout: float = opt(10.0, "seconds a client gets to send complete request headers", metavar="SECONDS")
    # 0 is "not given": an Application (or a factory's) keeps its own client_max_size, as under run_app.
    client_max_size: int = opt(0, "largest request body in bytes, streamed or not (413 beyond); it replaces an "
                               "Application's own client_max_size. 0, the default: an Application keeps its own "
                               "(aiohttp's 1 MiB unless it sets one), a bare handler gets 1 MiB", metavar="BYTES")
    body_timeout: float = opt(10.0, "window in which a request body must bring --body-min-rate x SECONDS bytes, "
                              "or get 408 and lose its connection (slow POST); 0: no deadline", metavar="SECONDS")
    body_min_rate: int = opt(500, "bytes per second a request body must average over each --body-timeout window; "
                             "0: any byte will do (an idle timeout)", metavar="BYTES")
    max_requests: int = opt(0, "recycle a worker after this many requests (0: never)", metavar="N")
    max_requests_jitter: int = opt(0, "add up to this many to --max-requests per worker", metavar="N")
    max_memory: int = opt(0, "recycle a worker whose resident memory passes this many MiB (0: never)",
                          metavar="MB")
    tcp_keepalive: bool = opt(True, "enable TCP keepalive probes so half-open connections die")
    certfile: str = opt("", "serve HTTPS with this PEM certificate (its chain after it): TLS 1.2 and up, ALPN "
                        "http/1.1, the handshake in the workers within --header-timeout; workers read it when they "
                        "start, so a reload (SIGHUP) serves a rotated one", metavar="FILE")
    keyfile: str = opt("", "the certificate's private key, unencrypted PEM (default: the key in --certfile)",
                       metavar="FILE")
    ca_certs: str = opt("", "CA certificates (PEM) that client certificates are verified against", metavar="FILE")
    cert_reqs: int = opt(0, "client certificates: 0 not asked for, 1 verified when sent, 2 required; 1 and 2 need "
                         "--ca-certs", metavar="N")
    ciphers: str = opt("", "TLS 1.2 cipher list in OpenSSL syntax (default: Python's)", metavar="LIST")
    proxy_protocol: bool = opt(False, "peers in --forwarded-allow-ips must begin each connection with a PROXY "
                               "protocol v1 or v2 header naming the client (else it is closed); others are served "
                               "as the clients they are")
    loop: str = opt("auto", "event loop of the master and the workers: auto = uvloop when installed",
                    choices=LOOPS)
    log_level: str = opt("info", "log level", choices=LOG_LEVELS)
    access_log: bool = opt(False, "log every request from the workers, to stdout (as --access-logfile -)")
    access_logfile: str = opt("", "log every request from the workers to FILE, '-' for stdout; reopened on SIGUSR1 "
                              "(logrotate)", metavar="FILE")
    access_log_format: str = opt(DEFAULT_ACCESS_LOG_FORMAT, "access line format with gunicorn's atoms: %%(h)s "
                                 "client, %%(t)s time, %%(r)s request line, %%(s)s status, %%(b)s body bytes, "
                                 "%%(L)s seconds, %%(D)s microseconds, %%({Header}i)s, %%({Header}o)s, ... "
                                 "(default: the combined log format plus %%(L)s)", metavar="FORMAT")
    error_logfile: str = opt("-", "write the master's and workers' log lines to FILE, '-' for stderr; reopened on "
                             "SIGUSR1 (logrotate)", metavar="FILE")
    log_format: str = opt("text", "log lines as text or json (one object per line: time, level, logger, pid, "
                          "role, slot, message; access lines add the request's fields)", choices=LOG_FORMATS)
    log_config: str = opt("", "a logging.dictConfig in a JSON or TOML file, applied in the master and every "
                          "worker after the options above", metavar="FILE")
    metrics_bind: str = opt(DEFAULT_METRICS_BIND, "HOST:PORT for /metrics, /healthz, /readyz; 'none' disables",
                            metavar="ADDR")
    control_socket: str = opt("", "path of the 0600 control socket (default: <--name, else the first bind>.sock in "
                                  "$XDG_RUNTIME_DIR/balancer, else $TMPDIR/balancer-<uid>)",
                              metavar="PATH")
    pid_file: str = opt("", "write the master's pid here", metavar="PATH", aliases=("--pid",))
    name: str = opt("", "a name for this instance, shown by `balancer status` and in process titles, and used by "
                    "`balancer status --name` to pick it (default: its first bind)", metavar="NAME")
    proxy_headers: bool = opt(True, "take the client's address and scheme from X-Forwarded-For and -Proto, or "
                              "Forwarded's for= and proto=, only when the peer is in --forwarded-allow-ips")
    forwarded_host: bool = opt(False, "with --proxy-headers, take request.host from X-Forwarded-Host or "
                               "Forwarded's host= too; only when the proxy sets that header itself (nginx: "
                               "proxy_set_header X-Forwarded-Host $host), since a client's own would pass "
                               "same-origin checks such as a WebSocket's")
    forwarded_allow_ips: str = opt("127.0.0.1", "peers trusted with proxy headers: comma-separated IPs and CIDR "
                                   "networks, or * for every peer; unix-socket peers always are", metavar="IPS")
    socket_mode: str = opt("", "permission bits of unix-socket binds, octal, e.g. 0660 (default: 0777 less the "
                           "umask)", metavar="MODE")
    socket_group: str = opt("", "group of unix-socket binds, name or gid (default: the master's)", metavar="GROUP")
    umask: str = opt("", "umask of the master and its workers, octal, e.g. 027 (default: inherited)", metavar="MASK")
    user: str = opt("", "run the master (once it has bound its sockets) and the workers as this user, name or uid; "
                    "needs root", metavar="USER")
    group: str = opt("", "run them with this group, name or gid (default: --user's primary group)", metavar="GROUP")
    initgroups: bool = opt(False, "give them --user's supplementary groups from the group database (default: none)")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first option that cannot work."""
        if ":" not in self.backend or not all(self.backend.split(":", 1)):
            raise ConfigError(f"bad --backend {self.backend!r}: {backend_hint(self.backend)}")
        if self.app_dir and not os.path.isdir(self.app_dir):
            raise ConfigError(f"--app-dir {self.app_dir}: " + ("not a directory" if os.path.exists(self.app_dir)
                                                                else "no such directory"))
        if not self.bind:
            raise ConfigError("at least one --bind is required")
        for text in self.bind:
            try:
                parse_bind(text)
            except ConfigError as exc:
                raise ConfigError(f"--bind: {exc}") from None
        if self.metrics_bind != "none":
            try:
                b = parse_bind(self.metrics_bind)
            except ConfigError as exc:
                raise ConfigError(f"--metrics-bind: {exc}") from None
            if b.family != "tcp":
                raise ConfigError("--metrics-bind must be HOST:PORT or none")
        for name in ("workers", "worker_connections", "backlog"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.workers > MAX_WORKERS:
            raise ConfigError(f"--workers must be at most {MAX_WORKERS} ({WORKERS_PER_CPU} per usable CPU), "
                              f"got {self.workers}")
        for name in ("max_requests", "max_requests_jitter", "max_memory", "body_timeout", "body_min_rate",
                     "shutdown_delay", "client_max_size"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(self, name)}")
        for name in ("graceful_timeout", "timeout", "boot_timeout", "keepalive_timeout", "header_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if not 0 <= self.accept_coalesce <= MAX_COALESCE:
            raise ConfigError(f"--accept-coalesce must be between 0 and {MAX_COALESCE} seconds, "
                              f"got {self.accept_coalesce}")
        if self.loop not in LOOPS:
            raise ConfigError(f"--loop must be one of {', '.join(LOOPS)}")
        try:
            loop_factory(self.loop)
        except LoopUnavailable as exc:
            raise ConfigError(str(exc)) from None
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"--log-level must be one of {', '.join(LOG_LEVELS)}")
        self._validate_logging()
        if self.forwarded_host and not self.proxy_headers:
            raise ConfigError("--forwarded-host needs --proxy-headers")
        try:
            parse_allow_ips(self.forwarded_allow_ips)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        parse_octal(self.socket_mode, "--socket-mode")
        parse_octal(self.umask, "--umask")
        self._validate_tls()
        if self.reload:
            from balancer.devreload import require_watchfiles

            require_watchfiles()

    def _validate_logging(self) -> None:
        """A bad --log-format, --access-log-format or --log-config file stops start-up with one line."""
        if self.log_format not in LOG_FORMATS:
            raise ConfigError(f"--log-format must be one of {', '.join(LOG_FORMATS)}")
        try:
            check_format(self.access_log_format)
            if self.log_config:
                load_log_config(self.log_config)
        except (AccessFormatError, LogSetupError) as exc:
            raise ConfigError(str(exc)) from None

    def _validate_tls(self) -> None:
        """Load the TLS files once, so that a bad one stops start-up here rather than in every worker."""
        if self.cert_reqs not in (0, 1, 2):  # as balancer/tls.py CERT_REQS
            raise ConfigError(f"--cert-reqs must be 0 (none), 1 (optional) or 2 (required), got {self.cert_reqs}")
        if not self.certfile:
            for name in ("keyfile", "ca_certs", "cert_reqs", "ciphers"):
                if getattr(self, name):  # named alone, so that the message can say where it was set
                    raise ConfigError(f"--{name.replace('_', '-')} needs --certfile")
            return
        if self.cert_reqs and not self.ca_certs:
            raise ConfigError(f"--cert-reqs {self.cert_reqs} needs --ca-certs to verify client certificates with")
        from balancer.tls import TLSError, server_context

        try:
            server_context(self.certfile, self.keyfile, self.ca_certs, self.cert_reqs, self.ciphers)
        except TLSError as exc:
            raise ConfigError(str(exc)) from None

    @property
    def binds(self) -> list[Bind]:
        """The parsed --bind addresses."""
        return [parse_bind(b) for b in self.bind]

    def worker_settings(self) -> dict:
        """The subset of options a worker needs, as plain JSON-able values."""
        keys = ("backend", "app_dir", "keepalive_timeout", "header_timeout", "client_max_size", "graceful_timeout",
                "loop", "log_level", "access_log", "tcp_keepalive", "max_requests", "max_requests_jitter",
                "body_timeout", "body_min_rate", "proxy_headers", "forwarded_host", "forwarded_allow_ips",
                "proxy_protocol", "cert_reqs", "ciphers", "access_log_format", "log_format", "keepalive_rebalance")
        out = {k: getattr(self, k) for k in keys}
        abspath = os.path.abspath
        # Absolute: a worker's directory need not be ours.
        for name in ("certfile", "keyfile", "ca_certs", "log_config"):
            out[name] = abspath(getattr(self, name)) if getattr(self, name) else ""
        out["access_log"] = bool(self.access_log or self.access_logfile)  # --access-logfile alone turns it on
        for name in ("access_logfile", "error_logfile"):  # '-' is stdout or stderr
            value = getattr(self, name)
            out[name] = abspath(value) if value not in ("", "-") else value
        out["beat_interval"] = min(1.0, self.timeout / 4)  # several beats fit in one --timeout
        return out


# Master-side options a reload (SIGHUP) applies as it is; those the workers get apply to the workers it starts.
MASTER_RELOADABLE = ("workers", "timeout", "boot_timeout", "graceful_timeout", "shutdown_delay", "max_memory",
                     "accept_coalesce", "log_level")
# In the worker settings, but set on the master's listening sockets, which a reload keeps.
LISTENER_OPTIONS = ("tcp_keepalive",)


def reloadable_options(config: Config) -> frozenset[str]:
    """Options a reload can change; the rest (binds, sockets, files, identity) take a restart."""
    names = {f.name for f in fields(Config)}
    return frozenset((names & set(config.worker_settings())) | set(MASTER_RELOADABLE)) - set(LISTENER_OPTIONS)


def option_fields():
    """The Config fields, in declaration order, for the CLI generator."""
    return fields(Config)
