"""Every touch of aiohttp's internals, in one module, each checked once at import against the aiohttp installed.

The worker uses aiohttp's public API wherever it has one (request.protocol, request.method, request.content,
request.client_max_size, response.status, response.prepared, StreamReader's exception() and total_bytes) and
costs no more than the internal it replaces. What is left has no public form, and lives here: each internal is listed in
CHECKS with what proves that it still means what the worker relies on (tests/test_aiohttp_compat.py has a
contract test for each, run on the aiohttp floor too). A failed check does not fail the import: it leaves
PROBLEM set, and the worker refuses to boot with it (require(): one line naming the aiohttp version, exit 3),
rather than serve with a body limit, a deadline or a metric silently gone.

The hot path (each keep-alive request) pays nothing here: the per-request hooks are bound once per connection
(protocol_factory), not looked up through a helper per request. A request's method and body stream come from
the request factory's arguments, not from request properties (each one a Python call per request).

Handing an idle keep-alive connection back to the master (keep-alive rebalancing, workers/rebalance.py) reads
internals too: whether start() waits for the next request with nothing of one held (idle_between_requests()),
and that every byte read reaches the protocol through data_received() (not a buffered protocol's get_buffer),
where the worker notes whether the parser may hold part of a request (the C parser's state is not readable).
"""

from __future__ import annotations

import collections
import inspect

import aiohttp
from aiohttp import hdrs, web
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_server import Server
from aiohttp.web_urldispatcher import UrlMappingMatchInfo

VERSION = aiohttp.__version__
# aiohttp's development branch (4.0) awaits RequestHandler.log_access(); 3.x calls it.
LOG_ACCESS_AWAITED = inspect.iscoroutinefunction(RequestHandler.log_access)


class AiohttpChanged(RuntimeError):
    """An aiohttp internal the worker relies on is missing or means something else in the aiohttp installed."""


# ---- connections ------------------------------------------------------------------------------

class ServerProtocol(RequestHandler):
    """aiohttp's per-connection protocol as the worker runs it; a subclass defines serve_request() and log_access().

    A subclass's connection_made() calls this one's (ServerProtocol.connection_made).

    serve_request(protocol, request) is the connection's request handler, bound to it when the connection is
    made (protocol_factory): it gets its protocol without a lookup per request. log_access(protocol, request,
    response, start_time) is what aiohttp calls after each response; a sync one is made async where aiohttp
    awaits it.
    """

    __slots__ = ()
    from_proxy = False  # its peer is the transport's; with_peer()'s classes say True
    resumed = False  # a kept-alive connection another worker gave back (resumed()'s classes say True)

    def connection_made(self, transport) -> None:
        """aiohttp's, with its keep-alive timer held off until the first response.

        aiohttp arms that timer at connection start too, so it would cut the first request's headers at the
        keep-alive timeout; the worker gives those headers its own deadline (--header-timeout). With _keepalive
        off the timer does nothing when it fires, and aiohttp sets _keepalive again from the first response:
        the keep-alive timeout governs only the idle time between requests. (RequestHandler.keep_alive(False),
        public, does the same but cancels and re-arms the timer: 2% more instructions per connection.)
        """
        RequestHandler.connection_made(self, transport)
        # A resumed connection is between requests already: idle, it closes at the keep-alive timeout.
        self._keepalive = self.resumed
        if self.resumed and self._keepalive_handle is None and self._keepalive_timeout:
            # aiohttp before 3.14.5 arms the timer only after a response: without this, never.
            close_time = self._loop.time() + self._keepalive_timeout
            self._next_keepalive_close_time = close_time
            self._keepalive_handle = self._loop.call_at(close_time, self._process_keepalive)

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        log_access = cls.__dict__.get("log_access")
        if LOG_ACCESS_AWAITED and log_access is not None and not inspect.iscoroutinefunction(log_access):
            async def awaited_log_access(self, request, response, start_time=None) -> None:
                log_access(self, request, response, start_time)

            cls.log_access = awaited_log_access

    async def serve_request(self, request):
        """The connection's request handler (a subclass's)."""
        raise NotImplementedError


def with_peer(cls: type) -> type:
    """cls, reporting a peer address set on it (the PROXY header's client) instead of the transport's."""
    # RequestHandler.peername is a cached property that each request reads (request.remote, the access log);
    # a slot of the same name in a subclass comes first, and holds the address given.
    return type(f"{cls.__name__}WithPeer", (cls,), {"__slots__": ("peername",), "__doc__": with_peer.__doc__,
                                                    "from_proxy": True})


def resumed(cls: type) -> type:
    """cls, for a kept-alive connection another worker gave back (keep-alive rebalancing)."""
    return type(f"{cls.__name__}Resumed", (cls,), {"__slots__": (), "__doc__": resumed.__doc__, "resumed": True})


def protocol_factory(server: Server, loop, cls: type, request_factory=None, resumed_wrap=None):
    """What makes each connection's protocol for aiohttp's Server: a cls, with the Server's handler options.

    Called with no argument, the connection's peer is the transport's; with an address, that address (PROXY);
    resumed=True for a connection that served in another worker before (its class resumed_wrap(class), when
    given). request_factory, when given, makes the connection's requests instead of the Server's.
    """
    # As aiohttp's Server.__call__ does, with the options the Server was given (there is no public way to give
    # Server a RequestHandler class); the Server stays the manager of each connection.
    options = server._kwargs
    peer_cls = with_peer(cls)
    wrap = resumed_wrap or (lambda c: c)
    classes = {(False, False): cls, (True, False): peer_cls, (False, True): wrap(resumed(cls)),
               (True, True): wrap(resumed(peer_cls))}

    def make_protocol(peername=None, resume: bool = False) -> ServerProtocol:
        if peername is None and not resume:
            protocol = cls(server, loop=loop, **options)
        else:
            protocol = classes[peername is not None, resume](server, loop=loop, **options)
            if peername is not None:
                protocol.peername = peername
        # Read by RequestHandler.start() for each request; aiohttp clears both when the connection is lost.
        protocol._request_handler = protocol.serve_request
        if request_factory is not None:
            protocol._request_factory = request_factory
        return protocol

    return make_protocol


def queued(protocol: RequestHandler) -> int:
    """Requests received in full on this connection and waiting behind the one being handled."""
    return len(protocol._messages)


def idle_between_requests(protocol: RequestHandler) -> bool:
    """True when start() waits for the connection's next request, keep-alive, and aiohttp holds no part of one.

    The parser's own partial bytes are not visible here: the caller knows from data_received() (rebalance.py).
    """
    waiter = protocol._waiter
    return (waiter is not None and not waiter.done() and not protocol._messages and not protocol._message_tail
            and protocol._keepalive and not protocol._force_close and not protocol._close
            and protocol._payload_parser is None and not protocol._upgraded)


# ---- request bodies -----------------------------------------------------------------------------

def replace_body_buffer(stream: StreamReader, make) -> None:
    """Give a body stream the buffer make(its current buffer) returns: aiohttp's parser appends each piece to it."""
    stream._buffer = make(stream._buffer)


def body_buffer(stream: StreamReader):
    """A body stream's buffer (the one replace_body_buffer() gave it, if it did)."""
    return stream._buffer


def unread_bytes(stream: StreamReader) -> int:
    """Bytes of a body that arrived and that the handler has not read yet."""
    return stream._size


def set_client_max_size(app: web.Application, size: int) -> None:
    """Make app give its requests this client_max_size (request.client_max_size, checked by read() and post())."""
    app._client_max_size = size  # no public setter; aiohttp reads it for every request it makes


# ---- routing ------------------------------------------------------------------------------------

def routerless(app: web.Application, route: web.AbstractRoute):
    """A request handler for an app whose one route takes every request: Application._handle's work, no router.

    The route takes every request, so resolving it only costs time: ~9% of a keep-alive request's worker CPU
    (py-spy). The handler still gets a web.Request with match_info, app and Expect: 100-continue handled.
    Returns the handler's coroutine rather than wrapping it in one of its own, which would cost a frame.
    """
    handler, expect = route.handler, route.handle_expect_header

    def dispatch(request: web.Request):
        match_info = UrlMappingMatchInfo({}, route)  # one per request: handlers may write to it
        match_info.add_app(app)
        match_info.freeze()
        request._match_info = match_info  # as Application._handle sets it: request.match_info has no setter
        if request.headers.get(hdrs.EXPECT):
            return _expect_then_handle(request, expect, handler)
        return handler(request)

    return dispatch


async def _expect_then_handle(request: web.Request, expect, handler):
    """Answer Expect: 100-continue the way aiohttp's Application does, then run the handler."""
    response = await expect(request)
    await request.writer.drain()
    if response is not None:
        return response
    return await handler(request)


# ---- per-connection costs ---------------------------------------------------------------------------

def skip_second_nodelay() -> None:
    """Let aiohttp skip setting TCP_NODELAY on connections uvloop already set it on.

    aiohttp's BaseProtocol.connection_made sets TCP_NODELAY on every connection through the module function
    base_protocol.tcp_nodelay, via transport.get_extra_info("socket"), which under uvloop builds a socket object
    for the fd (a getsockname, a setsockopt and a detach). The fd has it already twice over: the master sets it
    on its TCP listeners (Linux copies it to each accepted socket) and uvloop's TCPTransport sets it when it
    opens the fd. Any other transport (asyncio's, with --loop asyncio) still gets aiohttp's call. Only a saving:
    where aiohttp no longer calls that function, nothing is lost but the saving, so it is no boot error.
    """
    try:
        import aiohttp.base_protocol as base_protocol
        from uvloop.loop import TCPTransport
    except ImportError:
        return
    original = getattr(base_protocol, "tcp_nodelay", None)
    if original is None or getattr(original, "skips_uvloop", False):
        return

    def tcp_nodelay(transport, value: bool) -> None:
        if value and type(transport) is TCPTransport:
            return
        original(transport, value)

    tcp_nodelay.skips_uvloop = True
    base_protocol.tcp_nodelay = tcp_nodelay


# ---- the checks, once at import ---------------------------------------------------------------

class _ProbeLoop:
    """Stands in for the event loop where aiohttp's constructors only keep it."""

    def get_debug(self) -> bool:
        return False


async def _probe_handler(request):
    """A request handler for the probe Server; never called."""


def _reads(function, *names: str) -> bool:
    """True when function's code (a property's or cached property's getter's) names every one of names."""
    function = getattr(function, "fget", None) or getattr(function, "wrapped", function)
    code = function.__code__
    return all(name in code.co_names for name in names)


def _check_server_options() -> str | None:
    server = Server(_probe_handler, loop=_ProbeLoop(), keepalive_timeout=7.0)
    if getattr(server, "_kwargs", None) != {"keepalive_timeout": 7.0}:
        return "Server._kwargs no longer holds the options each RequestHandler is made with"
    return None


def _check_request_hooks() -> str | None:
    server = Server(_probe_handler, loop=_ProbeLoop())
    protocol = RequestHandler(server, loop=_ProbeLoop())
    if getattr(protocol, "_request_handler", None) is not server.request_handler or \
            getattr(protocol, "_request_factory", None) != server.request_factory:
        return "RequestHandler no longer keeps its request handler and factory in _request_handler/_request_factory"
    if not _reads(RequestHandler.start, "_request_handler", "_request_factory"):
        return "RequestHandler.start() no longer reads _request_handler and _request_factory for each request"
    if hasattr(RequestHandler, "serve_request"):
        return "RequestHandler has a serve_request of its own, which the worker's would replace"
    # A request factory is called with (message, payload, protocol, writer, task), the message a
    # RawRequestMessage, the payload EMPTY_PAYLOAD when the request has no body (workers/observe.py).
    if list(inspect.signature(web.Application._make_request).parameters)[1:6] != [
            "message", "payload", "protocol", "writer", "task"] or not hasattr(RawRequestMessage, "method"):
        return "request factories are no longer called with (message, payload, protocol, writer, task)"
    return None


def _check_queue() -> str | None:
    protocol = RequestHandler(Server(_probe_handler, loop=_ProbeLoop()), loop=_ProbeLoop())
    if not isinstance(getattr(protocol, "_messages", None), collections.deque) or \
            not _reads(RequestHandler.start, "_messages"):
        return "RequestHandler no longer queues received requests in its _messages deque"
    return None


def _check_keepalive() -> str | None:
    protocol = RequestHandler(Server(_probe_handler, loop=_ProbeLoop()), loop=_ProbeLoop())
    if not isinstance(getattr(protocol, "_keepalive", None), bool) or \
            not _reads(RequestHandler._process_keepalive, "_keepalive") or \
            not _reads(RequestHandler.start, "_keepalive", "keep_alive"):
        return ("RequestHandler's keep-alive timer no longer heeds _keepalive, or start() no longer sets it from "
                "each response")
    # A resumed connection arms the timer itself where aiohttp does not at connection start (connection_made).
    if getattr(protocol, "_keepalive_handle", 0) is not None or \
            not isinstance(getattr(protocol, "_next_keepalive_close_time", None), float) or \
            getattr(protocol, "_keepalive_timeout", None) != protocol.keepalive_timeout or \
            not _reads(RequestHandler._process_keepalive, "_next_keepalive_close_time", "_keepalive_handle"):
        return ("RequestHandler's keep-alive timer is no longer the _keepalive_handle that _process_keepalive() "
                "re-arms for _next_keepalive_close_time")
    return None


def _check_log_access() -> str | None:
    if not _reads(RequestHandler.finish_response, "log_access"):
        return "RequestHandler.finish_response() no longer calls log_access() after each response"
    if list(inspect.signature(RequestHandler.log_access).parameters)[:3] != ["self", "request", "response"]:
        return "RequestHandler.log_access() no longer takes (request, response, ...)"
    return None


def _check_peername() -> str | None:
    if not hasattr(RequestHandler, "peername") or not _reads(BaseRequest.__init__, "peername"):
        return "requests no longer take their client's address from RequestHandler.peername"
    protocol = with_peer(RequestHandler)(Server(_probe_handler, loop=_ProbeLoop()), loop=_ProbeLoop())
    protocol.peername = ("192.0.2.1", 1)
    if protocol.peername != ("192.0.2.1", 1):
        return "a RequestHandler subclass cannot set its peername"
    return None


class _Recording(collections.deque):
    """A body buffer noting the stream's total_bytes as each piece is appended."""

    __slots__ = ("stream", "totals")

    def __init__(self, stream, old) -> None:
        super().__init__(old)
        self.stream = stream
        self.totals = []

    def append(self, data) -> None:
        self.totals.append(self.stream.total_bytes)
        super().append(data)


def _check_body_stream() -> str | None:
    stream = StreamReader(RequestHandler(Server(_probe_handler, loop=_ProbeLoop()), loop=_ProbeLoop()), 2 ** 16,
                          loop=_ProbeLoop())
    if not isinstance(getattr(stream, "_buffer", None), collections.deque):
        return "StreamReader no longer buffers a body in its _buffer deque"
    replace_body_buffer(stream, lambda old: _Recording(stream, old))
    stream.feed_data(b"abc")
    stream.feed_data(b"de")
    recording = body_buffer(stream)
    if recording.totals != [0, 3] or list(recording) != [b"abc", b"de"] or stream.total_bytes != 5:
        return "StreamReader.feed_data() no longer appends each piece to _buffer before counting it in total_bytes"
    if getattr(stream, "_size", None) != 5:
        return "StreamReader no longer counts its unread bytes in _size"
    return None


def _check_client_max_size() -> str | None:
    app = web.Application(client_max_size=12345)
    if getattr(app, "_client_max_size", None) != 12345 or not _reads(web.Application._make_request,
                                                                     "_client_max_size"):
        return "Application no longer gives its requests the client_max_size kept in _client_max_size"
    return None


def _check_match_info() -> str | None:
    if "_match_info" not in web.Request.ATTRS or not _reads(web.Application._handle, "_match_info") or \
            not _reads(web.Request.__dict__["match_info"], "_match_info"):
        return "Application._handle no longer gives a request its match_info in _match_info"
    for name in ("add_app", "freeze"):
        if not callable(getattr(UrlMappingMatchInfo, name, None)):
            return f"UrlMappingMatchInfo has no {name}()"
    if not callable(getattr(web.AbstractRoute, "handle_expect_header", None)):
        return "routes have no handle_expect_header()"
    return None


def _check_idle() -> str | None:
    protocol = RequestHandler(Server(_probe_handler, loop=_ProbeLoop()), loop=_ProbeLoop())
    for name, kind in (("_waiter", type(None)), ("_message_tail", bytes), ("_force_close", bool), ("_close", bool),
                       ("_payload_parser", type(None)), ("_upgraded", bool)):
        if not isinstance(getattr(protocol, name, 0), kind):
            return f"RequestHandler no longer keeps {name} as the worker reads it"
    if not _reads(RequestHandler.start, "_waiter", "_messages", "_force_close") or \
            not _reads(RequestHandler.data_received, "_parser", "_messages", "_message_tail", "_payload_parser"):
        return "RequestHandler.start() no longer waits on _waiter for the requests data_received() queues"
    if hasattr(RequestHandler, "get_buffer") or hasattr(RequestHandler, "buffer_updated"):
        return "RequestHandler is a buffered protocol: reads no longer all go through data_received()"
    return None


CHECKS = {
    "Server._kwargs": _check_server_options,
    "RequestHandler._request_handler/_request_factory": _check_request_hooks,
    "RequestHandler._messages": _check_queue,
    "RequestHandler._waiter/_message_tail/_payload_parser": _check_idle,
    "RequestHandler._keepalive": _check_keepalive,
    "RequestHandler.log_access": _check_log_access,
    "RequestHandler.peername": _check_peername,
    "StreamReader._buffer/_size": _check_body_stream,
    "Application._client_max_size": _check_client_max_size,
    "Request._match_info": _check_match_info,
}


def find_problem() -> str | None:
    """The first internal that does not hold in the aiohttp installed, as one line; None when all hold."""
    for name, check in CHECKS.items():
        try:
            problem = check()
        except Exception as exc:  # a constructor or attribute gone: the same finding
            problem = f"{type(exc).__name__}: {exc}"
        if problem:
            return (f"aiohttp {VERSION} is not supported: {name}: {problem} "
                    "(balancer supports aiohttp >= 3.14.0, < 4)")
    return None


PROBLEM = find_problem()


def require() -> None:
    """Raise AiohttpChanged naming what does not hold, if anything does not."""
    if PROBLEM is not None:
        raise AiohttpChanged(PROBLEM)
