"""HTTP for the registry client, over the standard library's http.client (bench/RESULTS.md, "Registry":
the fastest Python candidate here, flat memory, no dependency): one kept-alive connection per origin,
the TLS rule, HTTPS_PROXY/HTTP_PROXY/NO_PROXY, redirects that never carry credentials to another host,
network failures as one line."""
from __future__ import annotations

import base64
import http.client
import ipaddress
import socket
import ssl
from dataclasses import dataclass, field
from typing import Mapping, Optional, Protocol, Union
from urllib.parse import unquote, urljoin, urlsplit
from urllib.request import getproxies_environment, proxy_bypass

from .errors import EnvironmentFailure, UsageError



class Readable(Protocol):
    def read(self, size: int = -1) -> bytes: ...


Body = Union[bytes, Readable, None]
REDIRECTS = {301, 302, 303, 307, 308}
MAX_REDIRECTS = 5
SEND_BLOCK = 1 << 20  # http.client sends a file body in blocks of this size (its default, 8 KiB, costs CPU)
USER_AGENT = "isep-registry-client"


class NetworkError(EnvironmentFailure):
    """The connection failed or dropped: an upload or a download may resume after it."""


def split_host(host: str) -> tuple[str, Optional[int]]:
    """'h:5000' -> ('h', 5000); '[::1]:5000' -> ('::1', 5000); 'h' -> ('h', None)."""
    if host.startswith("["):
        name, _, rest = host[1:].partition("]")
        return name, int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
    name, colon, port = host.rpartition(":")
    if colon and port.isdigit() and ":" not in name:
        return name, int(port)
    return host, None


def is_loopback(host: str) -> bool:
    """localhost, 127.0.0.0/8 or ::1, with or without a port."""
    name = split_host(host)[0].lower().rstrip(".")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def plain_http_allowed(host: str, insecure: bool) -> bool:
    return insecure or is_loopback(host)


def origin(host: str, insecure: bool) -> str:
    """The base URL of a registry named by HOST[:PORT] or by a URL (a mirror may be given as either).
    TLS unless plain HTTP is allowed; an explicit http:// to another host is refused."""
    if "@" in host:
        raise UsageError("a registry or mirror address names no user (credentials: ISEP_REGISTRY_USERNAME and "
                         "ISEP_REGISTRY_PASSWORD, or the docker config file)")
    if "://" in host:
        parts = urlsplit(host)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path.strip("/") or parts.query:
            raise UsageError(f"{host}: not a registry address (HOST[:PORT] or http(s)://HOST[:PORT])")
        if parts.scheme == "http" and not plain_http_allowed(parts.netloc, insecure):
            raise UsageError(f"{host}: plain HTTP to a host that is not loopback needs --insecure")
        return f"{parts.scheme}://{parts.netloc}"
    return ("http" if plain_http_allowed(host, insecure) else "https") + "://" + host


@dataclass(frozen=True)
class Proxy:
    address: str  # host:port of the proxy
    headers: dict[str, str] = field(repr=False)  # Proxy-Authorization when its URL names a user


def proxy_for(scheme: str, netloc: str) -> Optional[Proxy]:
    """The proxy of HTTPS_PROXY/HTTP_PROXY (either case) for a registry, unless NO_PROXY names it or it
    is a loopback host. Only http:// proxies (as docker and curl use them)."""
    if is_loopback(netloc):
        return None
    proxies = getproxies_environment()
    name = split_host(netloc)[0]
    if scheme not in proxies or proxy_bypass(name):
        return None
    parts = urlsplit(proxies[scheme] if "://" in proxies[scheme] else "http://" + proxies[scheme])
    if parts.scheme != "http" or not parts.hostname:
        raise UsageError(f"{scheme}_proxy: only an http:// proxy is supported")
    headers = {}
    if parts.username is not None:
        secret = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        headers["Proxy-Authorization"] = "Basic " + base64.b64encode(secret).decode()
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return Proxy(f"{host}:{parts.port or 80}", headers)


def _where(url: str) -> str:
    """The host:port of a URL for a message, without any user:password@."""
    return urlsplit(url).netloc.rpartition("@")[2] or "?"


def describe(exc: BaseException) -> str:
    """A network failure in a few words (no URL: an upload URL carries the registry's state token)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted ({exc.verify_message})"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failed ({exc.reason or exc})"
    if isinstance(exc, socket.gaierror):
        return "unknown host"
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(exc, http.client.RemoteDisconnected):
        return "the connection was closed by the server"
    if isinstance(exc, http.client.IncompleteRead):
        return "the connection dropped in the middle of a body"
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return type(exc).__name__


class Http:
    """Kept-alive connections, one per origin (scheme, host, port). A response must be read to its end
    (or release()d) before the next request to the same origin."""

    def __init__(self, timeout: float, insecure: bool):
        self.timeout = timeout
        self.insecure = insecure
        self._connections: dict[tuple[str, str], http.client.HTTPConnection] = {}
        self._plain_proxies: dict[tuple[str, str], Optional[Proxy]] = {}  # plain HTTP through a proxy
        self._tls = ssl.create_default_context()

    def close(self) -> None:
        for connection in self._connections.values():
            connection.close()
        self._connections.clear()

    def _connection(self, scheme: str, netloc: str) -> http.client.HTTPConnection:
        key = (scheme, netloc)
        if key not in self._connections:
            proxy = proxy_for(scheme, netloc)
            address = proxy.address if proxy else netloc
            if scheme == "https":
                connection: http.client.HTTPConnection = http.client.HTTPSConnection(
                    address, timeout=self.timeout, context=self._tls, blocksize=SEND_BLOCK)
                if proxy:  # CONNECT through the proxy; TLS with the registry inside the tunnel
                    name, port = split_host(netloc)
                    connection.set_tunnel(name, port, headers=proxy.headers)
            else:
                connection = http.client.HTTPConnection(address, timeout=self.timeout, blocksize=SEND_BLOCK)
            self._connections[key] = connection
            self._plain_proxies[key] = proxy if proxy and scheme == "http" else None
        return self._connections[key]

    def drop(self, url: str) -> None:
        parts = urlsplit(url)
        connection = self._connections.pop((parts.scheme, parts.netloc), None)
        if connection is not None:
            connection.close()

    def check_scheme(self, url: str) -> None:
        parts = urlsplit(url)
        if "@" in parts.netloc:  # a redirect to user:password@host: refused, and never echoed
            raise EnvironmentFailure(f"refusing a URL with credentials in it (to {_where(url)})")
        if parts.scheme == "https":
            return
        if parts.scheme != "http" or not plain_http_allowed(parts.netloc, self.insecure):
            raise EnvironmentFailure(f"refusing {parts.scheme or 'a relative'} URL to {_where(url)}: "
                                     "plain HTTP only for a loopback host or with --insecure")

    def send(self, method: str, url: str, headers: Mapping[str, str], body: Body = None) -> http.client.HTTPResponse:
        """One request. A kept-alive connection the server had closed is retried once on a new one when
        the body can be sent again (bytes or none); any other failure is a NetworkError."""
        self.check_scheme(url)
        parts = urlsplit(url)
        target = parts.path + ("?" + parts.query if parts.query else "")
        all_headers = {"User-Agent": USER_AGENT, **headers}
        if body is None and method in ("POST", "PUT", "PATCH"):
            all_headers.setdefault("Content-Length", "0")
        for attempt in (0, 1):
            reused = (parts.scheme, parts.netloc) in self._connections
            connection = self._connection(parts.scheme, parts.netloc)
            proxy = self._plain_proxies.get((parts.scheme, parts.netloc))
            sent = {**all_headers, **proxy.headers} if proxy else all_headers
            try:
                connection.request(method, f"http://{parts.netloc}{target}" if proxy else target, body=body,
                                   headers=sent)
                return connection.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                self.drop(url)
                stale = isinstance(exc, (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError))
                if attempt == 0 and reused and stale and not hasattr(body, "read"):
                    continue
                raise NetworkError(f"registry {_where(url)}: {describe(exc)}") from exc
        raise AssertionError("unreachable")

    def follow(self, method: str, url: str, headers: Mapping[str, str]) -> tuple[http.client.HTTPResponse, str]:
        """GET or HEAD, following redirects (registries send blobs to their storage); the Authorization
        header goes only to the host it was meant for. Returns the response and its URL."""
        headers = dict(headers)
        for _ in range(MAX_REDIRECTS + 1):
            response = self.send(method, url, headers)
            location = response.getheader("Location")
            if response.status not in REDIRECTS or not location:
                return response, url
            self.release(response, url)
            target = urljoin(url, location)
            if urlsplit(target).netloc != urlsplit(url).netloc:
                headers.pop("Authorization", None)
            url = target
        raise EnvironmentFailure(f"registry {_where(url)}: more than {MAX_REDIRECTS} redirects")

    def release(self, response: http.client.HTTPResponse, url: str, keep_limit: int = 1 << 16) -> bytes:
        """Read a small rest of the body so that the connection can be used again; drop it otherwise.
        Returns what was read (an error body, for the message)."""
        if response.length is not None and response.length > keep_limit:
            response.close()
            self.drop(url)
            return b""
        try:
            data = response.read(keep_limit + 1)
        except (OSError, http.client.HTTPException):
            self.drop(url)
            return b""
        if len(data) > keep_limit or response.will_close:
            response.close()
            self.drop(url)
        return data
