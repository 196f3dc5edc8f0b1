"""workers/aiohttp_compat.py: a contract test per aiohttp internal the worker relies on, on real aiohttp objects
serving real requests over socketpairs; a broken internal refuses the worker's boot. tests/run.sh runs this
file on the aiohttp floor too; tests/test_aiohttp_seam.py holds the line that nothing else touches them."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket

import aiohttp
import pytest
from aiohttp import web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.streams import EMPTY_PAYLOAD

from balancer_workers import aiohttp_compat as compat
from tests.harness import Balancer

pytestmark = pytest.mark.timeout(60)
GET = b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n"


@contextlib.asynccontextmanager
async def connected(app: web.Application, make_cls=None, handler=None, wrap_factory=None, peername=None,
                    early: bytes = b"", **runner_options):
    """A client socket connected to app through protocol_factory, over a socketpair; early is sent first.

    make_cls(Base) returns the ServerProtocol subclass to serve with; by default one whose serve_request
    awaits handler (the app's own by default). wrap_factory(the Server's request factory) makes requests.
    """
    loop = asyncio.get_running_loop()
    runner = web.AppRunner(app, handle_signals=False, access_log=None, **runner_options)
    await runner.setup()
    server = runner.server
    inner = handler or server.request_handler

    class Default(compat.ServerProtocol):
        __slots__ = ()

        async def serve_request(self, request):
            return await inner(request)

    cls = make_cls(compat.ServerProtocol) if make_cls else Default
    request_factory = wrap_factory(server.request_factory) if wrap_factory else None
    factory = compat.protocol_factory(server, loop, cls, request_factory)
    ours, theirs = socket.socketpair()
    theirs.sendall(early)  # there before aiohttp reads anything: one read
    ours.setblocking(False)
    theirs.setblocking(False)
    await loop.connect_accepted_socket(factory if peername is None else lambda: factory(peername), ours)
    try:
        yield theirs
    finally:
        theirs.close()
        await runner.cleanup()


def serve(app: web.Application, raw: bytes, answers: int = 1, **options) -> bytes:
    """Serve raw, sent before aiohttp reads anything, through protocol_factory; what the client got back."""
    async def scenario() -> bytes:
        loop = asyncio.get_running_loop()
        async with connected(app, early=raw, **options) as client:
            got = b""
            while got.count(b"HTTP/1.1 ") < answers:
                got += await asyncio.wait_for(loop.sock_recv(client, 1 << 20), 10)
            return got

    return asyncio.run(scenario())


async def unused(request):
    """The route of apps whose protocol answers without the app."""
    raise AssertionError("the app's handler was called")


def app_with(handler=unused, **kwargs) -> web.Application:
    app = web.Application(**kwargs)
    app.router.add_route("*", "/{tail:.*}", handler)
    return app


def test_every_internal_holds_on_this_aiohttp():
    assert compat.PROBLEM is None, compat.PROBLEM
    assert compat.find_problem() is None
    compat.require()


# ---- one contract per internal --------------------------------------------------------------------

def test_server_kwargs_give_each_protocol_the_servers_options():
    async def scenario():
        runner = web.AppRunner(app_with(), handle_signals=False, keepalive_timeout=7.5, access_log=None)
        await runner.setup()
        cls = type("P", (compat.ServerProtocol,), {"__slots__": ()})
        protocol = compat.protocol_factory(runner.server, asyncio.get_running_loop(), cls)()
        await runner.cleanup()
        return protocol

    protocol = asyncio.run(scenario())
    assert type(protocol).__name__ == "P" and protocol.keepalive_timeout == 7.5 and protocol.access_logger is None


def test_the_request_handler_is_bound_to_its_connection_and_the_request_factory_used():
    calls = []

    def make_cls(base):
        class Bound(base):
            __slots__ = ()

            async def serve_request(self, request):
                calls.append(("handler", self is request.protocol))
                return web.Response(text="bound")

        return Bound

    def wrap(make):
        def factory(message, payload, protocol, writer, task):
            calls.append(("factory", message.method, payload is EMPTY_PAYLOAD, type(protocol).__name__))
            return make(message, payload, protocol, writer, task)

        return factory

    post = b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nab"
    got = serve(app_with(), GET + post, make_cls=make_cls, wrap_factory=wrap, answers=2)
    assert got.count(b"bound") == 2
    assert calls == [("factory", "GET", True, "Bound"), ("handler", True),
                     ("factory", "POST", False, "Bound"), ("handler", True)]


def test_queued_counts_the_requests_received_behind_the_current_one():
    queued = []

    async def handler(request):
        queued.append(compat.queued(request.protocol))
        return web.Response(text="q")

    serve(app_with(handler), GET * 3, answers=3)  # all three arrive in one read
    assert queued == [2, 1, 0]


def test_idle_between_requests_is_true_only_while_start_waits_with_nothing_of_a_request_held():
    """Keep-alive rebalancing moves a connection only when this says so (workers/rebalance.py)."""
    seen = []

    async def handler(request):
        seen.append(("in handler", compat.idle_between_requests(request.protocol)))
        return web.Response(text="i")

    async def scenario():
        loop = asyncio.get_running_loop()
        holder = {}

        def make_cls(base):
            class Noting(base):
                __slots__ = ()

                async def serve_request(self, request):
                    holder["p"] = self
                    return await handler(request)

            return Noting

        async with connected(app_with(), make_cls=make_cls, early=GET * 2) as client:
            got = b""
            while got.count(b"HTTP/1.1 ") < 2:
                got += await asyncio.wait_for(loop.sock_recv(client, 65536), 10)
            for _ in range(20):  # start() gets to its wait within a few turns
                if compat.idle_between_requests(holder["p"]):
                    break
                await asyncio.sleep(0)
            seen.append(("idle", compat.idle_between_requests(holder["p"])))
            await loop.sock_sendall(client, GET[:10])  # part of a request: the parser holds it, a buffer does not
            await asyncio.sleep(0.05)
            seen.append(("partial", compat.idle_between_requests(holder["p"])))
            await loop.sock_sendall(client, b"Connection: close\r\n" + GET[10:] )
            await asyncio.wait_for(loop.sock_recv(client, 65536), 10)
            seen.append(("closing", compat.idle_between_requests(holder["p"])))

    asyncio.run(scenario())
    # The first handler runs with the pipelined second queued; then idle; a partial request is not seen here
    # (the C parser's own state), which is why the worker counts reads as well; a closing one is not idle.
    assert seen[0] == ("in handler", False) and ("idle", True) in seen and seen[-1] == ("closing", False), seen


def test_resumed_protocols_start_between_requests_and_proxied_ones_say_so():
    async def scenario():
        runner = web.AppRunner(app_with(), handle_signals=False, access_log=None)
        await runner.setup()
        cls = type("P", (compat.ServerProtocol,), {"__slots__": ()})
        make = compat.protocol_factory(runner.server, asyncio.get_running_loop(), cls)
        made = [make(), make(("192.0.2.1", 1)), make(None, True), make(("192.0.2.1", 1), True)]
        await runner.cleanup()
        return made

    plain, proxied, resumed, both = asyncio.run(scenario())
    assert [p.resumed for p in (plain, proxied, resumed, both)] == [False, False, True, True]
    assert [p.from_proxy for p in (plain, proxied, resumed, both)] == [False, True, False, True]
    assert proxied.peername == both.peername == ("192.0.2.1", 1)


def test_a_resumed_connection_left_idle_closes_at_the_keepalive_timeout():
    """A connection given back by another worker is between requests already: the keep-alive timer runs."""
    async def scenario():
        loop = asyncio.get_running_loop()
        runner = web.AppRunner(app_with(), handle_signals=False, access_log=None, keepalive_timeout=0.3)
        await runner.setup()
        cls = type("P", (compat.ServerProtocol,), {"__slots__": ()})
        make = compat.protocol_factory(runner.server, loop, cls)
        ends = []
        for resume in (True, False):
            ours, theirs = socket.socketpair()
            ours.setblocking(False)
            theirs.setblocking(False)
            await loop.connect_accepted_socket(lambda resume=resume: make(None, resume), ours)
            ends.append(theirs)
        started = loop.time()
        assert await asyncio.wait_for(loop.sock_recv(ends[0], 100), 10) == b""
        closed_after = loop.time() - started
        with pytest.raises(asyncio.TimeoutError):  # a new one waits for its first request (the header deadline)
            await asyncio.wait_for(loop.sock_recv(ends[1], 100), 0.5)
        for end in ends:
            end.close()
        await runner.cleanup()
        return closed_after

    assert 0.2 <= asyncio.run(scenario()) < 3


def test_the_keepalive_timer_spares_the_first_requests_headers_and_times_the_idle_after_it():
    """aiohttp's keep-alive timer runs from connection start; held off until the first response."""
    async def handler(request):
        return web.Response(text="late but served")

    async def scenario():
        loop = asyncio.get_running_loop()
        async with connected(app_with(handler), keepalive_timeout=0.3) as client:
            await asyncio.sleep(0.8)  # past the keep-alive timeout, no request yet
            await loop.sock_sendall(client, GET)
            got = await asyncio.wait_for(loop.sock_recv(client, 65536), 10)
            answered = loop.time()
            assert await asyncio.wait_for(loop.sock_recv(client, 65536), 10) == b""  # closed idle
            return got, loop.time() - answered

    got, idle = asyncio.run(scenario())
    assert b"late but served" in got
    assert 0.2 <= idle < 3, idle


def test_log_access_is_called_once_per_response_with_the_request_and_response():
    logged = []

    def make_cls(base):
        class Logged(base):
            __slots__ = ()

            async def serve_request(self, request):
                return web.Response(status=201, text="made")

            def log_access(self, request, response, start_time=None):
                logged.append((request.method, response.status, self is request.protocol))

        return Logged

    serve(app_with(), GET + GET, make_cls=make_cls, answers=2)
    assert logged == [("GET", 201, True)] * 2


def test_a_sync_log_access_is_made_awaitable_where_aiohttp_awaits_it(monkeypatch):
    """aiohttp's development branch (4.0) awaits RequestHandler.log_access()."""
    monkeypatch.setattr(compat, "LOG_ACCESS_AWAITED", True)
    logged = []

    class Logged(compat.ServerProtocol):
        __slots__ = ()

        def log_access(self, request, response, start_time=None):
            logged.append((request, response, start_time))

    assert asyncio.iscoroutinefunction(Logged.log_access)
    asyncio.run(Logged.log_access(None, "request", "response", 1.5))
    assert logged == [("request", "response", 1.5)]
    monkeypatch.setattr(compat, "LOG_ACCESS_AWAITED", False)

    class Plain(compat.ServerProtocol):
        __slots__ = ()

        def log_access(self, request, response, start_time=None):
            pass

    assert not asyncio.iscoroutinefunction(Plain.log_access)


def test_a_peer_given_to_the_protocol_is_each_requests_remote():
    async def handler(request):
        real = request.transport.get_extra_info("peername")
        return web.Response(text=f"{request.remote}|{real!r}")

    got = serve(app_with(handler), GET + GET, peername=("192.0.2.7", 4242), answers=2)
    assert got.count(b"192.0.2.7|''") == 2, got  # the socketpair's own peer is still the transport's
    assert b"192.0.2.7" not in serve(app_with(handler), GET)


def test_a_replaced_body_buffer_sees_each_piece_before_it_is_counted_and_unread_bytes_are_known():
    seen = {}

    class Recording(collections.deque):
        def __init__(self, old, stream):
            super().__init__(old)
            self.stream, self.totals = stream, []

        def append(self, data):
            self.totals.append((self.stream.total_bytes, len(data)))
            super().append(data)

    async def handler(request):
        stream = request.content
        compat.replace_body_buffer(stream, lambda old: Recording(old, stream))
        await asyncio.sleep(0.2)  # the rest of the body arrives meanwhile, unread
        seen["unread"] = compat.unread_bytes(stream)
        seen["body"] = await request.read()
        seen["totals"] = compat.body_buffer(stream).totals
        return web.Response(text="read")

    head = b"POST /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
    body = b"4\r\nabcd\r\n3\r\nefg\r\n0\r\n\r\n"

    async def scenario():
        loop = asyncio.get_running_loop()
        async with connected(app_with(handler)) as client:
            await loop.sock_sendall(client, head)
            await asyncio.sleep(0.05)  # the handler runs, the body not sent yet
            await loop.sock_sendall(client, body)
            return await asyncio.wait_for(loop.sock_recv(client, 65536), 10)

    assert b"read" in asyncio.run(scenario())
    assert seen["body"] == b"abcdefg" and seen["unread"] == 7
    assert seen["totals"] in ([(0, 4), (4, 3)], [(0, 7)])  # each piece appended before total_bytes counts it


def test_client_max_size_set_on_an_application_is_each_requests_limit():
    async def handler(request):
        size = request.client_max_size
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return web.Response(text=f"{size} too large")
        return web.Response(text=f"{size} read {len(body)}")

    def limited() -> web.Application:
        app = app_with(handler)  # aiohttp's default, 1 MiB
        compat.set_client_max_size(app, 10)
        return app

    big = b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 11\r\n\r\n" + b"x" * 11
    small = b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\n" + b"x" * 10
    assert b"10 too large" in serve(limited(), big)
    assert b"10 read 10" in serve(limited(), small)


def test_routerless_dispatch_gives_the_handler_what_application_handle_does():
    seen = []

    def bare_app():
        async def handler(request):
            before = sorted(request.match_info)
            request.match_info["written"] = "yes"  # per request: the next one must not see it
            seen.append((request.match_info.route.method, request.app is app, len(request.config_dict), before,
                         list(request.match_info.apps) == [app], await request.read()))
            return web.Response(text="handled")

        app = web.Application()
        route = app.router.add_route("*", "/{tail:.*}", handler)
        return app, route

    app, _ = bare_app()
    serve(app, GET + GET, answers=2)  # through the router, as Application._handle does it
    routed = list(seen)
    seen.clear()
    app, route = bare_app()
    serve(app, GET + GET, handler=compat.routerless(app, route), answers=2)
    # The same route, app and config, fresh per request; without the router's {tail} match (no router ran)
    assert routed == [("*", True, 0, ["tail"], True, b"")] * 2, routed
    assert seen == [("*", True, 0, [], True, b"")] * 2, seen
    # Expect: 100-continue is answered before the handler reads the body
    seen.clear()
    expect = b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\nab"
    app, route = bare_app()
    got = serve(app, expect, handler=compat.routerless(app, route), answers=2)
    assert seen[0][-1] == b"ab"
    assert got.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200"), got


def test_aiohttp_still_sets_tcp_nodelay_through_the_function_the_worker_replaces():
    """Only a saving (tests/test_tuning.py shows it working): here, that it still applies."""
    assert "tcp_nodelay" in BaseProtocol.connection_made.__code__.co_names


# ---- a broken internal ------------------------------------------------------------------------------

def test_a_missing_internal_is_one_problem_naming_the_aiohttp_version(monkeypatch):
    from aiohttp.web_server import Server

    original = Server.__init__

    def init_without_kwargs(self, *args, **kwargs):
        original(self, *args, **kwargs)
        del self._kwargs

    monkeypatch.setattr(Server, "__init__", init_without_kwargs)
    problem = compat.find_problem()
    assert problem is not None and "\n" not in problem
    assert problem.startswith(f"aiohttp {aiohttp.__version__} is not supported: Server._kwargs: "), problem
    monkeypatch.setattr(compat, "PROBLEM", problem)
    with pytest.raises(compat.AiohttpChanged, match="Server._kwargs"):
        compat.require()


BREAK_KWARGS = '''
import aiohttp.web_server

_original = aiohttp.web_server.Server.__init__


def _init(self, *args, **kwargs):
    _original(self, *args, **kwargs)
    del self._kwargs


aiohttp.web_server.Server.__init__ = _init
'''


def test_the_worker_refuses_to_boot_on_an_aiohttp_whose_internals_moved(tmp_path):
    """One line, exit 3, nothing served: never a worker serving without its limits or metrics."""
    (tmp_path / "sitecustomize.py").write_text(BREAK_KWARGS)  # in the master and every worker
    with Balancer("--workers", "1", ready=False, env={"PYTHONPATH": str(tmp_path)}) as b:
        assert b.wait(60) == 3
        lines = [line for line in b.lines if "not supported" in line]
    assert len(lines) == 1 and "Traceback" not in b.log(), b.log()
    assert f"worker failed to boot: aiohttp {aiohttp.__version__} is not supported: Server._kwargs: " in lines[0]
