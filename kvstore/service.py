"""What both HTTP services (``kvstore daemon`` and ``kvstore serve``) share.

- :class:`HTTPError`: a refusal with a status, a message for the client and headers.
- :func:`error_middleware`: every refusal, aiohttp's own 404/405/413 and any
  unexpected exception become one error body, rendered by the service (no traceback
  ever reaches a client; unexpected errors are logged and answered 500).
- :func:`timing_middleware`: every request's endpoint, status and duration, for metrics.
- :func:`auth_middleware`: a bearer credential checked in constant time on every route
  but the open ones (liveness probes).
- :func:`is_loopback` and :func:`check_exposure`: one rule for who may listen without
  a credential (loopback addresses and names that resolve only to them).
- :func:`redact_url` (from :mod:`kvstore.urls`): URLs in logs without their passwords.
- :func:`run_until_signal`: listen (the start-up heap frozen out of the cyclic garbage
  collector), run until SIGTERM/SIGINT, then shut down gracefully.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import ipaddress
import logging
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Collection, Mapping

from aiohttp import web
from aiohttp.typedefs import Middleware

from kvstore.urls import redact_url

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

logger = logging.getLogger("kvstore.service")


# ---------------------------------------------------------------------------- errors


class HTTPError(Exception):
    """A request a service refuses: HTTP ``status`` and a ``message`` for the client."""

    def __init__(self, status: int, message: str,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


Render = Callable[[HTTPError], web.Response]
"""How a service writes an error body (the daemon's JSON, OpenAI's error object)."""


def error_middleware(render: Render, *, body_limit: int) -> Middleware:
    """Middleware turning every failure into ``render(HTTPError)``: an :class:`HTTPError`
    as raised, aiohttp's 404/405/413 with messages that name the route, the allowed
    methods or the limit (``body_limit`` bytes), and anything else a logged 500."""

    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except HTTPError as exc:
            return render(exc)
        except web.HTTPException as exc:  # aiohttp's own 404, 405, 413 ...
            return render(_from_aiohttp(request, exc, body_limit))
        except Exception:
            logger.exception("internal error in %s %s", request.method, request.path)
            return render(HTTPError(500, "internal error (logged by the server)"))

    return errors


def _from_aiohttp(request: web.Request, exc: web.HTTPException, body_limit: int) -> HTTPError:
    headers = {k: v for k, v in exc.headers.items() if k in ("Allow", "Retry-After")}
    if exc.status == 404:
        message = f"no such endpoint: {request.method} {request.path}"
    elif exc.status == 405:
        message = (f"method {request.method} not allowed for {request.path}; allowed: "
                   f"{exc.headers.get('Allow', '')}")
    elif exc.status == 413:
        from kvstore.units import format_size

        message = f"request body too large (limit {format_size(body_limit)})"
    else:
        message = exc.reason
    return HTTPError(exc.status, message, headers)


def timing_middleware(record: Callable[[str, web.StreamResponse, float], None]) -> Middleware:
    """Outermost middleware: ``record(endpoint, response, seconds)`` for every request;
    ``endpoint`` is the route's name (``"other"`` for unknown routes)."""

    @web.middleware
    async def timing(request: web.Request, handler: Handler) -> web.StreamResponse:
        start = time.perf_counter()
        resp = await handler(request)
        record(request.match_info.route.name or "other", resp, time.perf_counter() - start)
        return resp

    return timing


def auth_middleware(credential: str | None, open_paths: Collection[str],
                    refuse: Callable[[str], HTTPError]) -> Middleware:
    """Middleware requiring ``Authorization: Bearer <credential>`` (compared in constant
    time) on every path but ``open_paths``; ``refuse(reason)`` is the 401 to raise.
    ``credential`` ``None``: everything is open."""

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if credential is not None and request.path not in open_paths:
            given = request.headers.get("Authorization", "")
            scheme, _, value = given.partition(" ")
            ok = hmac.compare_digest(value.strip().encode("utf-8", "surrogateescape"),
                                     credential.encode())
            if scheme.lower() != "bearer" or not ok:
                raise refuse("missing Authorization header" if not given
                             else "invalid bearer credential")
        return await handler(request)

    return auth


# ---------------------------------------------------------------------------- addresses


def is_loopback(host: str) -> bool:
    """True when ``host`` (an address or a name) reaches this machine only.

    Names are resolved; a name that does not resolve, or resolves to any address that is
    not loopback, is not loopback. ``""``, ``0.0.0.0`` and ``::`` (all interfaces) are not.
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except (OSError, UnicodeError):
        return False
    addresses = {str(info[4][0]) for info in infos}
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback
                                   for a in addresses)


def check_exposure(host: str, credential: str | None, what: str, how: str) -> None:
    """The one rule of both services: listening beyond loopback needs a credential.
    ``ValueError`` naming ``what`` an intruder could do and ``how`` to set one."""
    if credential is None and not is_loopback(host):
        raise ValueError(f"refusing to listen on {host} (not a loopback address) without a "
                         f"credential: anyone who can reach it could {what}. Set {how}, or "
                         "bind 127.0.0.1")


def check_api_key(key: str | None, how: str) -> None:
    """A bearer key as a client can send it: not blank, no surrounding whitespace (a
    trailing newline read from a file), printable. ``ValueError`` naming ``how`` it was
    given otherwise; ``None`` (no key) passes."""
    if key is None:
        return
    if not key.strip():
        raise ValueError(f"{how} must not be blank")
    if key != key.strip():
        raise ValueError(f"{how} starts or ends with whitespace (a newline from a file?): "
                         "clients could never send it; strip it")
    if not key.isprintable():
        raise ValueError(f"{how} holds control characters: use printable text")


def address_url(address: object) -> str:
    """``http://host:port`` of an address aiohttp listens on (IPv6 in brackets)."""
    host, port = address[0], address[1]  # type: ignore[index]
    return f"http://[{host}]:{port}" if ":" in str(host) else f"http://{host}:{port}"


# ---------------------------------------------------------------------------- serving


async def run_until_signal(app: web.Application, host: str, port: int, *,
                           shutdown_timeout_s: float,
                           on_listening: Callable[[list[str]], None],
                           on_stop: Callable[[str], None],
                           on_second_signal: Callable[[str], None] | None = None,
                           access_log: logging.Logger | None = None,
                           cancel_on_disconnect: bool = False) -> None:
    """Serve ``app`` on ``host:port`` until SIGTERM or SIGINT, then shut down gracefully.

    ``on_listening(urls)`` is called once listening; ``on_stop(signal name)`` when the
    first signal arrives; ``on_second_signal(name)`` if another arrives while requests
    in flight are finishing. Shutdown closes the listener, gives requests in flight up
    to ``shutdown_timeout_s`` seconds, then runs the application's cleanup hooks.
    ``cancel_on_disconnect``: a client that goes away cancels its handler. Raises
    ``OSError`` when the address cannot be bound (cleanup hooks run first).
    """
    runner = web.AppRunner(app, handle_signals=False, handler_cancellation=cancel_on_disconnect,
                           shutdown_timeout=shutdown_timeout_s, access_log=access_log)
    await runner.setup()
    loop = asyncio.get_running_loop()
    installed = False
    try:
        await web.TCPSite(runner, host, port).start()
        stop = asyncio.Event()
        received: list[str] = []

        def on_signal(sig: signal.Signals) -> None:
            received.append(sig.name)
            if len(received) == 2 and on_second_signal is not None:
                on_second_signal(sig.name)
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
        installed = True
        # Everything built so far (modules, a model, pools, the index) lives as long as
        # the process: freeze it out of the cyclic collector, whose full collections
        # otherwise scan it all on the serving thread (`python -m bench.gc_bench`: a
        # wave of 8,400 new blocks through the index collected for up to 156 ms with the
        # start-up heap tracked, 15 ms frozen). Garbage is collected first, so none of
        # it is frozen in.
        gc.collect()
        gc.freeze()
        on_listening([address_url(a) for a in runner.addresses])
        await stop.wait()
        on_stop(received[0])
    finally:
        try:
            await runner.cleanup()
        finally:
            if installed:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)


__all__ = ["HTTPError", "address_url", "auth_middleware", "check_exposure", "error_middleware",
           "is_loopback", "redact_url", "run_until_signal", "timing_middleware"]
