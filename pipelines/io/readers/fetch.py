"""Concurrent, bounded HTTP(S) image fetching for URL-only sources (the published COYO-700M parquet).

What img2dataset does, and what carries over (its ``downloader.py``): a thread pool per shard, a
per-request timeout (10 s), a user agent that names the tool, retries, and the opt-out directives it
honours by default: an ``X-Robots-Tag`` header carrying ``noai``, ``noimageai``, ``noindex`` or
``noimageindex`` (optionally scoped as ``<ua-token>: ...``) means the image is not used. Every URL gets a
status like img2dataset's status column (``success`` / ``failed_to_download`` + error message), plus our
own ``opt_out``, ``image_too_large`` and ``refused_private_network``.

On top of that, because a URL is data and not configuration:

- the address is checked **at connect time**, after DNS resolution, for every connection (so for every
  redirect hop too, and a DNS answer cannot change between the check and the connect): loopback,
  private, link-local (169.254.169.254, the cloud metadata service), CGNAT, multicast, reserved and
  IPv4-mapped/NAT64/6to4 forms of those are refused unless the source sets ``allow_private_networks``;
- redirects are followed by hand, each hop's scheme checked against ``fetch_schemes``;
- the body is streamed and aborted past ``max_bytes`` (decoded bytes, so a gzip bomb stops too), and
  the whole attempt has a deadline, so a server that drips one byte at a time cannot hold a thread;
- retries with exponential backoff only on 429, 5xx and transport errors, bounded, honouring a
  numeric ``Retry-After`` up to ``max_backoff_s``.

urllib3 is the HTTP client: on the loopback benchmark (benchmarks/bench_fetch.py) its connection pool
served the same URLs from 16 threads about 2x faster than one shared httpx client, and the fetcher is
the ingest bottleneck of a URL-only source. The only hand-written networking is the connect-time address
guard (a ``_new_conn`` override), because no client has a hook between DNS resolution and connect.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urljoin, urlsplit

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import (
    ConnectTimeoutError,
    NameResolutionError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
)
from urllib3.util import connection as _connection

from vila2_curate.schemas.config import FetchConfig

SUCCESS = "success"
FAILED = "failed_to_download"
OPT_OUT = "opt_out"
TOO_LARGE = "image_too_large"
REFUSED = "refused_private_network"
REFUSED_REASON = "url_refused_private_network"  # the row's drop_reason for a REFUSED fetch (quarantined)

_RETRY_STATUS = frozenset({429}) | frozenset(range(500, 600))
_CHUNK = 64 * 1024
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


@dataclass(frozen=True)
class FetchResult:
    """The outcome for one URL; ``data`` only on success. ``status`` mirrors img2dataset's column."""

    url: str
    status: str
    data: bytes | None = None
    error: str | None = None
    http_status: int | None = None
    attempts: int = 0

    def meta(self) -> dict[str, Any]:
        """What goes into the row's meta: deterministic fields only (no timings, no attempt counts)."""
        out: dict[str, Any] = {"status": self.status}
        if self.http_status is not None:
            out["http_status"] = self.http_status
        if self.error is not None:
            out["error_message"] = self.error
        return out


# ------------------------------------------------------------------------------------------- addresses


def address_is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True only for globally routable unicast addresses (embedded IPv4 forms are checked as IPv4)."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None and not address_is_public(embedded):
            return False
    return ip.is_global and not ip.is_multicast and not ip.is_reserved and not ip.is_unspecified


class RefusedAddress(Exception):
    """The host resolves to an address the source may not reach; never retried, never connected."""


def checked_addresses(host: str, port: int) -> list[str]:
    """The host's addresses; RefusedAddress when any of them is not public (a name that resolves to
    both a public and a private address is treated as hostile)."""
    infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    for a in addresses:
        if not address_is_public(ipaddress.ip_address(a.split("%", 1)[0])):
            raise RefusedAddress(f"{host} resolves to {a}, a non-public address")
    return addresses


class _GuardedConnect:
    """urllib3's ``_new_conn``, but the host is resolved and checked first and the socket connects to
    the checked address itself (an IP literal: no second DNS lookup can answer differently). TLS still
    verifies and sends SNI for the host name (urllib3 wraps the socket with ``server_hostname=host``)."""

    def _new_conn(self) -> socket.socket:
        host, port = self._dns_host, self.port  # type: ignore[attr-defined]
        try:
            addresses = checked_addresses(host, port)
        except socket.gaierror as e:
            raise NameResolutionError(self.host, self, e) from e  # type: ignore[attr-defined,arg-type]
        last: Exception | None = None
        for a in addresses:
            try:
                return _connection.create_connection(
                    (a, port), self.timeout, source_address=self.source_address,  # type: ignore[attr-defined]
                    socket_options=self.socket_options)  # type: ignore[attr-defined]
            except TimeoutError as e:
                last = ConnectTimeoutError(self, f"connection to {host} timed out")
                last.__cause__ = e
            except OSError as e:
                last = NewConnectionError(self, f"failed to establish a new connection: {e}")  # type: ignore[arg-type]
        raise last or NewConnectionError(self, f"no address for {host!r}")  # type: ignore[arg-type]


class _GuardedHTTPConnection(_GuardedConnect, HTTPConnection):
    pass


class _GuardedHTTPSConnection(_GuardedConnect, HTTPSConnection):
    pass


class _GuardedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _GuardedHTTPConnection


class _GuardedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _GuardedHTTPSConnection


def _pool_manager(config: FetchConfig, allow_private_networks: bool) -> urllib3.PoolManager:
    manager = urllib3.PoolManager(
        num_pools=max(64, config.threads), maxsize=config.threads, block=False,
        timeout=urllib3.Timeout(connect=config.timeout_s, read=config.timeout_s), retries=False,
        headers={"User-Agent": config.user_agent})
    if not allow_private_networks:
        manager.pool_classes_by_scheme = {"http": _GuardedHTTPPool, "https": _GuardedHTTPSPool}
    return manager


# ------------------------------------------------------------------------------------------- opt-out


def opt_out_directive(values: Sequence[str], ua_token: str, disallowed: frozenset[str]) -> str | None:
    """The first disallowed X-Robots-Tag directive that applies to us, else None.

    Same reading as img2dataset's ``is_disallowed``: each header value is ``[<ua-token>:] d1, d2``; a
    value without a token applies to every agent, one with a token only when it is ours.
    """
    for value in values:
        token, sep, rest = value.partition(":")
        scoped = bool(sep) and token.strip() != "" and " " not in token.strip() and "," not in token
        directives = rest if scoped else value
        if scoped and token.strip().lower() != ua_token:
            continue
        for d in directives.split(","):
            d = d.strip().lower()
            if d in disallowed:
                return d
    return None


# ------------------------------------------------------------------------------------------- fetcher


class _Retryable(Exception):
    def __init__(self, message: str, http_status: int | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.http_status = http_status
        self.retry_after = retry_after


def _short(e: BaseException, limit: int = 200) -> str:
    msg = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


class Fetcher:
    """Fetches URLs on a bounded thread pool with one shared keep-alive urllib3 connection pool.

    ``submit`` returns a future so a reader can start the next batch's downloads while the current one
    is processed; results are collected in submission order, so row order never depends on timing.
    """

    def __init__(self, config: FetchConfig, schemes: Sequence[str], allow_private_networks: bool) -> None:
        self.config = config
        self.schemes = frozenset(s.lower() for s in schemes)
        self.allow_private_networks = allow_private_networks
        self._disallowed = frozenset(d.strip().lower() for d in config.disallowed_header_directives)
        self._ua_token = config.user_agent_token.strip().lower()
        self._http = _pool_manager(config, allow_private_networks)
        self._pool = ThreadPoolExecutor(max_workers=config.threads, thread_name_prefix="vila2-fetch")
        self._closed = threading.Event()

    def __enter__(self) -> Fetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if not self._closed.is_set():
            self._closed.set()
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._http.clear()

    def submit(self, url: str) -> Future[FetchResult]:
        return self._pool.submit(self.fetch, url)

    def fetch_many(self, urls: Sequence[str]) -> list[FetchResult]:
        """Results in the order of ``urls``."""
        return [f.result() for f in [self.submit(u) for u in urls]]

    def fetch(self, url: str) -> FetchResult:
        """One URL, with bounded retries; never raises for anything the server or network does."""
        cfg = self.config
        attempt = 0
        while True:
            attempt += 1
            try:
                return replace(self._attempt(url), attempts=attempt)
            except RefusedAddress as e:
                return FetchResult(url, REFUSED, error=str(e), attempts=attempt)
            except _Retryable as e:
                if attempt > cfg.retries or self._closed.is_set():
                    return FetchResult(url, FAILED, error=str(e), http_status=e.http_status, attempts=attempt)
                wait = min(cfg.max_backoff_s, cfg.backoff_s * 2 ** (attempt - 1))
                if e.retry_after is not None:
                    wait = min(cfg.max_backoff_s, max(wait, e.retry_after))
                time.sleep(wait)
            except Exception as e:  # noqa: BLE001 - a bad URL or protocol oddity is this row's failure
                return FetchResult(url, FAILED, error=_short(e), attempts=attempt)

    def _attempt(self, url: str) -> FetchResult:
        cfg = self.config
        deadline = time.monotonic() + cfg.timeout_s
        current = url
        for _hop in range(cfg.max_redirects + 1):
            scheme = urlsplit(current).scheme.lower()
            if scheme not in self.schemes:
                return FetchResult(url, FAILED, error=f"scheme {scheme!r} not allowed (fetch_schemes)")
            try:
                resp = self._http.request("GET", current, preload_content=False, redirect=False, retries=False)
            except NameResolutionError as e:  # a dead domain does not come back on retry
                return FetchResult(url, FAILED, error=_short(e))
            except (NewConnectionError, ConnectTimeoutError, ReadTimeoutError, ProtocolError) as e:
                raise _Retryable(_short(e)) from e  # connect/read errors and timeouts: worth another try
            try:
                location = resp.get_redirect_location()
                if location:
                    resp.close()  # its body is not wanted; an unread response cannot go back to the pool
                    current = urljoin(current, location)
                    continue
                return self._response(url, resp, deadline)
            except (ReadTimeoutError, ProtocolError) as e:
                raise _Retryable(_short(e)) from e
            finally:
                resp.release_conn()
        return FetchResult(url, FAILED, error=f"more than {cfg.max_redirects} redirects")

    def _response(self, url: str, resp: urllib3.BaseHTTPResponse, deadline: float) -> FetchResult:
        """Status, opt-out and size checks, then the body streamed under the byte cap and the deadline.
        Any early return closes the connection instead of reading an unwanted body to its end."""
        result = self._read(url, resp, deadline)
        if result.status != SUCCESS:
            resp.close()
        return result

    def _read(self, url: str, resp: urllib3.BaseHTTPResponse, deadline: float) -> FetchResult:
        cfg = self.config
        code = resp.status
        if code in _RETRY_STATUS:
            resp.close()
            raise _Retryable(f"HTTP {code}", http_status=code, retry_after=_retry_after(resp))
        if not 200 <= code < 300:
            return FetchResult(url, FAILED, error=f"HTTP {code}", http_status=code)
        if self._disallowed:
            directive = opt_out_directive(resp.headers.getlist("x-robots-tag"), self._ua_token, self._disallowed)
            if directive is not None:
                return FetchResult(url, OPT_OUT, error=f"X-Robots-Tag: {directive}", http_status=code)
        length = resp.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > cfg.max_bytes:
            return FetchResult(url, TOO_LARGE, error=f"Content-Length {length} > max_bytes {cfg.max_bytes}",
                               http_status=code)
        buf = bytearray()
        for chunk in resp.stream(_CHUNK, decode_content=True):
            buf += chunk
            if len(buf) > cfg.max_bytes:
                return FetchResult(url, TOO_LARGE, error=f"body exceeds max_bytes {cfg.max_bytes}",
                                   http_status=code)
            if time.monotonic() > deadline:
                resp.close()
                raise _Retryable(f"timed out after {cfg.timeout_s} s reading the body", http_status=code)
        if not buf:
            return FetchResult(url, FAILED, error="empty body", http_status=code)
        return FetchResult(url, SUCCESS, data=bytes(buf), http_status=code)


def _retry_after(resp: urllib3.BaseHTTPResponse) -> float | None:
    value = (resp.headers.get("retry-after") or "").strip()
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff
