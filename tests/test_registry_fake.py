"""isep/registry.py against small fake registries (no registry needed): the bearer-token path, redirects,
oversized and mismatching manifests, Range answers a real registry does not give, TLS and plain-HTTP
rules, network failures. The real registry is the registry tier's (tests/registry/)."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

import pytest

from isep import registry as registry_module
from isep.errors import BadInput, EnvironmentFailure, ExitStatus, IntegrityError, UsageError
from isep.registry import MANIFEST_LIMIT, RegistryClient

BLOB = os.urandom(300_000)
BLOB_DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
NO_CONFIG = {"DOCKER_CONFIG": "/nonexistent-isep-test"}
CREDENTIALS = {**NO_CONFIG, "ISEP_REGISTRY_USERNAME": "u", "ISEP_REGISTRY_PASSWORD": "pw"}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, status: int, body: bytes = b"", headers: dict | None = None, length: int | None = None):
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self):
        self.server.seen.append((self.command, self.path, dict(self.headers)))
        self.server.app(self)

    do_HEAD = do_PUT = do_POST = do_PATCH = do_GET


class Fake:
    def __init__(self, app: Callable[[Handler], None], address: str = "127.0.0.1"):
        self.server = ThreadingHTTPServer((address, 0), Handler)
        self.server.daemon_threads = True
        self.server.app = app
        self.server.seen = []
        self.port = self.server.server_address[1]
        self.host = f"127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def seen(self) -> list:
        return self.server.seen

    def __enter__(self) -> Fake:
        return self

    def __exit__(self, *exc_info):
        self.server.shutdown()
        self.server.server_close()


def blob_with_range(h: Handler, body: bytes = BLOB) -> None:
    """A blob GET as distribution answers it: Range honoured, the digest as ETag."""
    wanted = h.headers.get("Range")
    if wanted:
        start = int(wanted.split("=")[1].rstrip("-"))
        h.reply(206, body[start:], {"Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}"})
    else:
        h.reply(200, body, {"ETag": f'"{BLOB_DIGEST}"'})


def test_bearer_token_from_the_challenge_cached_per_scope():
    def app(h: Handler) -> None:
        if h.path.startswith("/token"):
            if h.headers.get("Authorization") != "Basic " + base64.b64encode(b"u:pw").decode():
                return h.reply(401, b"{}")
            return h.reply(200, json.dumps({"token": "tok-" + h.path.split("scope=")[1]}).encode())
        if not (h.headers.get("Authorization") or "").startswith("Bearer tok-repository%3Ar%3Apull"):
            challenge = (f'Bearer realm="http://127.0.0.1:{h.server.server_address[1]}/token",'
                         'service="fake",scope="repository:r:pull"')
            return h.reply(401, b'{"errors": [{"code": "UNAUTHORIZED"}]}', {"WWW-Authenticate": challenge})
        return blob_with_range(h)

    with Fake(app) as fake:
        with RegistryClient(fake.host, environ=CREDENTIALS) as client:
            assert client.fetch_bytes("r", BLOB_DIGEST, len(BLOB)) == BLOB
            assert client.fetch_bytes("r", BLOB_DIGEST, len(BLOB)) == BLOB
        token_requests = [path for _, path, _ in fake.seen if path.startswith("/token")]
        assert token_requests == ["/token?service=fake&scope=repository%3Ar%3Apull"]
        with RegistryClient(fake.host, environ={**CREDENTIALS, "ISEP_REGISTRY_PASSWORD": "bad"}) as client:
            with pytest.raises(EnvironmentFailure, match="access denied for user 'u'") as caught:
                client.fetch_bytes("r", BLOB_DIGEST, len(BLOB))
            assert "bad" not in str(caught.value)


def test_redirect_to_another_host_carries_no_credentials():
    def app(h: Handler) -> None:
        if h.path.startswith("/storage"):
            return blob_with_range(h)
        if h.headers.get("Authorization") is None:
            return h.reply(401, b"", {"WWW-Authenticate": 'Basic realm="fake"'})
        # the same server under another name: another host as far as credentials go
        h.reply(307, b"", {"Location": f"http://localhost:{h.server.server_address[1]}/storage/blob"})

    with Fake(app, "0.0.0.0") as fake, RegistryClient(fake.host, environ=CREDENTIALS) as client:
        assert client.fetch_bytes("r", BLOB_DIGEST, len(BLOB)) == BLOB
        storage = [headers for _, path, headers in fake.seen if path.startswith("/storage")]
        assert storage and all("Authorization" not in headers for headers in storage)
        assert any("Authorization" in headers for _, path, headers in fake.seen if path.startswith("/v2/"))


def test_redirect_to_plain_http_elsewhere_or_with_credentials_is_refused():
    targets = ["http://storage.example/blob", "https://u:secret@storage.example/blob"]

    def app(h: Handler) -> None:
        h.reply(307, b"", {"Location": targets[len(h.server.seen) - 1]})

    with Fake(app) as fake, RegistryClient(fake.host, environ=NO_CONFIG) as client:
        with pytest.raises(EnvironmentFailure, match="plain HTTP only for a loopback host or with --insecure"):
            client.fetch_bytes("r", BLOB_DIGEST, len(BLOB))
        with pytest.raises(EnvironmentFailure, match="credentials in it") as caught:
            client.fetch_bytes("r", BLOB_DIGEST, len(BLOB))
        assert "secret" not in str(caught.value)


@pytest.mark.parametrize("chunked", [False, True])
def test_manifest_over_the_limit_is_bad_input(chunked):
    def app(h: Handler) -> None:
        if not chunked:
            return h.reply(200, b"{}", length=MANIFEST_LIMIT + 1)
        h.send_response(200)
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        block = b"x" * (1 << 20)
        try:
            for _ in range(5):
                h.wfile.write(b"%x\r\n%s\r\n" % (len(block), block))
            h.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass

    with Fake(app) as fake, RegistryClient(fake.host, environ=NO_CONFIG) as client:
        with pytest.raises(BadInput, match="limit") as caught:
            client.get_manifest("r", "1")
        assert caught.value.status == ExitStatus.BAD_INPUT


def test_manifest_digest_mismatch_is_integrity_error():
    body = b'{"schemaVersion": 2}'
    digest = "sha256:" + hashlib.sha256(body).hexdigest()

    def app(h: Handler) -> None:
        h.reply(200, body + b" ", {"Docker-Content-Digest": digest})

    with Fake(app) as fake, RegistryClient(fake.host, environ=NO_CONFIG) as client:
        with pytest.raises(IntegrityError):
            client.get_manifest("r", digest)
        with pytest.raises(IntegrityError):
            client.get_manifest("r", "tag")  # the registry's own Docker-Content-Digest disagrees


def test_range_answered_200_starts_over(tmp_path):
    with Fake(lambda h: h.reply(200, BLOB)) as fake, RegistryClient(fake.host, environ=NO_CONFIG) as client:
        (tmp_path / "out.partial").write_bytes(BLOB[:1000])
        assert client.fetch_blob("r", BLOB_DIGEST, len(BLOB), str(tmp_path / "out")) == len(BLOB)
    assert (tmp_path / "out").read_bytes() == BLOB
    assert fake.seen[0][2].get("If-Range") == f'"{BLOB_DIGEST}"' and fake.seen[0][2]["Range"] == "bytes=1000-"


def test_wrong_content_range_fails_and_leaves_nothing(tmp_path):
    def app(h: Handler) -> None:
        h.reply(206, BLOB[10:], {"Content-Range": f"bytes 10-{len(BLOB) - 1}/{len(BLOB)}"})

    with Fake(app) as fake, RegistryClient(fake.host, environ=NO_CONFIG) as client:
        (tmp_path / "out.partial").write_bytes(BLOB[:1000])
        with pytest.raises(IntegrityError, match="Content-Range"):
            client.fetch_blob("r", BLOB_DIGEST, len(BLOB), str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []


def test_dropped_download_resumes_from_where_it_stopped(tmp_path):
    state = {"cut": False}

    def app(h: Handler) -> None:
        if not state["cut"]:
            state["cut"] = True
            h.send_response(200)
            h.send_header("Content-Length", str(len(BLOB)))
            h.end_headers()
            h.wfile.write(BLOB[:100_000])
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        blob_with_range(h)

    with Fake(app) as fake, RegistryClient(fake.host, environ=NO_CONFIG) as client:
        assert client.fetch_blob("r", BLOB_DIGEST, len(BLOB), str(tmp_path / "out")) == len(BLOB)
    assert (tmp_path / "out").read_bytes() == BLOB
    assert [headers.get("Range") for _, _, headers in fake.seen] == [None, "bytes=100000-"]


def test_longer_body_than_the_size_is_integrity_error(tmp_path):
    with Fake(lambda h: h.reply(200, BLOB + b"extra")) as fake, RegistryClient(fake.host, environ=NO_CONFIG) as c:
        with pytest.raises(IntegrityError, match="longer"):
            c.fetch_blob("r", BLOB_DIGEST, len(BLOB), str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []


def outbound_address() -> str | None:
    """This machine's address on its default route (not loopback), if it has one."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))  # TEST-NET-1: nothing is sent
        address = probe.getsockname()[0]
    except OSError:
        return None
    finally:
        probe.close()
    return None if address.startswith("127.") else address


def test_tls_unless_loopback_or_insecure(tmp_path):
    address = outbound_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to test the TLS rule with")
    with Fake(blob_with_range, "0.0.0.0") as fake:
        host = f"{address}:{fake.port}"
        with RegistryClient(host, environ=NO_CONFIG, timeout=10) as client:
            with pytest.raises(EnvironmentFailure, match="TLS") as caught:
                client.fetch_bytes("r", BLOB_DIGEST, len(BLOB))
            assert caught.value.status == ExitStatus.ENVIRONMENT
        assert fake.seen == []  # the plain-HTTP server never saw a request: the client spoke TLS
        with RegistryClient(host, insecure=True, environ=NO_CONFIG) as client:
            assert client.fetch_bytes("r", BLOB_DIGEST, len(BLOB)) == BLOB


def test_unreachable_registry_and_server_errors_are_one_line():
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()
    with RegistryClient(f"127.0.0.1:{port}", environ=NO_CONFIG) as client:
        with pytest.raises(EnvironmentFailure, match="refused") as caught:
            client.blob_size("r", BLOB_DIGEST)
        assert "\n" not in str(caught.value)

    def app(h: Handler) -> None:
        h.reply(500, b'{"errors": [{"code": "UNKNOWN", "message": "storage\\nbroken"}]}')

    with Fake(app) as fake, RegistryClient(fake.host, environ=NO_CONFIG) as client:
        with pytest.raises(EnvironmentFailure, match=r"HTTP 500 \(UNKNOWN: storage\?broken\)"):
            client.get_manifest("r", "1")


class UploadRegistry:
    """Just enough of the upload protocol, behind bearer tokens that the test can expire."""

    def __init__(self):
        self.uploads: dict[str, bytearray] = {}
        self.blobs: dict[str, bytes] = {}
        self.issued = 0
        self.valid_from = 1  # tokens numbered below have expired
        self.patches = 0
        self.expire_after_patches = 1

    def __call__(self, h: Handler) -> None:
        body = h.rfile.read(int(h.headers.get("Content-Length") or 0)) if h.command in ("PATCH", "PUT") else b""
        port = h.server.server_address[1]
        if h.path.startswith("/token"):
            self.issued += 1
            return h.reply(200, json.dumps({"token": f"tok-{self.issued}"}).encode())
        held = (h.headers.get("Authorization") or "").partition("Bearer tok-")[2]
        if not held.isdigit() or int(held) < self.valid_from:
            challenge = f'Bearer realm="http://127.0.0.1:{port}/token",service="fake"'
            return h.reply(401, b"{}", {"WWW-Authenticate": challenge})
        path, _, query = h.path.partition("?")
        if h.command == "HEAD":
            digest = path.rsplit("/", 1)[1]
            return h.reply(200 if digest in self.blobs else 404, length=len(self.blobs.get(digest, b"")))
        if h.command == "POST":
            name = f"u{len(self.uploads)}"
            self.uploads[name] = bytearray()
            return h.reply(202, b"", {"Location": f"/v2/r/blobs/uploads/{name}"})
        data = self.uploads[path.rsplit("/", 1)[1]]
        if h.command == "PATCH":
            start = int(h.headers["Content-Range"].split("-")[0])
            if start != len(data):
                return h.reply(416)
            data += body
            self.patches += 1
            if self.patches == self.expire_after_patches:
                self.valid_from = self.issued + 1  # every token issued so far has expired
        if h.command in ("PATCH", "GET"):
            return h.reply(202 if h.command == "PATCH" else 204, b"",
                           {"Location": path, "Range": f"0-{max(len(data) - 1, 0)}"})
        digest = query.split("digest=")[1]
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            return h.reply(400, b'{"errors": [{"code": "DIGEST_INVALID", "message": "digest mismatch"}]}')
        self.blobs[digest] = bytes(data)
        h.reply(201)


def test_token_expired_in_the_middle_of_an_upload_is_refreshed(tmp_path, monkeypatch):
    monkeypatch.setattr(registry_module, "UPLOAD_CHUNK", 100_000)
    (tmp_path / "blob").write_bytes(BLOB)
    app = UploadRegistry()
    with Fake(app) as fake, RegistryClient(fake.host, environ=NO_CONFIG) as client:
        assert client.push_blob("r", BLOB_DIGEST, len(BLOB), str(tmp_path / "blob")) == "uploaded"
        assert app.blobs[BLOB_DIGEST] == BLOB
        assert app.patches == 3  # the refused chunk was not counted: resumed at the right offset
        assert app.issued == 4  # pull and push, then both again after they expired
        # a file that is not the blob it claims to be: the registry's digest check, exit 5
        (tmp_path / "other").write_bytes(BLOB[::-1])
        with pytest.raises(IntegrityError, match="DIGEST_INVALID"):
            client.push_blob("r", "sha256:" + "0" * 64, len(BLOB), str(tmp_path / "other"))


def test_partial_file_that_is_a_link_is_refused(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_bytes(b"")
    (tmp_path / "out.partial").symlink_to(target)
    with Fake(blob_with_range) as fake, RegistryClient(fake.host, environ=NO_CONFIG) as client:
        with pytest.raises(EnvironmentFailure, match="out.partial") as caught:
            client.fetch_blob("r", BLOB_DIGEST, len(BLOB), str(tmp_path / "out"))
    assert caught.value.status == ExitStatus.ENVIRONMENT
    assert target.read_bytes() == b"" and not (tmp_path / "out").exists()


class ForwardProxy:
    """An HTTP proxy: CONNECT tunnels, and absolute-form requests passed on in origin form. Records the
    request lines and Proxy-Authorization headers it saw."""

    def __init__(self):
        self.seen: list[tuple[str, str | None]] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self.serve, args=(client,), daemon=True).start()

    def serve(self, client: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            head += client.recv(1)
        lines = head.decode().split("\r\n")
        method, target, version = lines[0].split(" ")
        auth = next((line.split(": ", 1)[1] for line in lines if line.lower().startswith("proxy-authorization")), None)
        self.seen.append((lines[0], auth))
        if method == "CONNECT":
            host, port = target.rsplit(":", 1)
            upstream = socket.create_connection((host, int(port)))
            client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:
            rest = target.split("://", 1)[1]
            hostport, _, path = rest.partition("/")
            host, port = hostport.rsplit(":", 1)
            upstream = socket.create_connection((host, int(port)))
            kept = [line for line in lines[1:] if not line.lower().startswith("proxy-authorization")]
            upstream.sendall("\r\n".join([f"{method} /{path} {version}", *kept]).encode())
        for source, sink in ((client, upstream), (upstream, client)):
            threading.Thread(target=pump, args=(source, sink), daemon=True).start()

    def close(self) -> None:
        self.listener.close()


def pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while True:
            data = source.recv(1 << 16)
            if not data:
                break
            sink.sendall(data)
    except OSError:
        pass
    for sock in (source, sink):
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


@pytest.fixture
def proxy_env(monkeypatch):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy", "ALL_PROXY",
                 "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    proxy = ForwardProxy()
    yield proxy, monkeypatch
    proxy.close()


def test_proxy_from_the_environment(proxy_env):
    proxy, monkeypatch = proxy_env
    address = outbound_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address: every registry here bypasses a proxy")
    monkeypatch.setenv("http_proxy", proxy.url.replace("://", "://user:p%40ss@"))
    monkeypatch.setenv("https_proxy", proxy.url)
    with Fake(blob_with_range, "0.0.0.0") as fake:
        host = f"{address}:{fake.port}"
        with RegistryClient(host, insecure=True, environ=NO_CONFIG) as client:
            assert client.fetch_bytes("r", BLOB_DIGEST, len(BLOB)) == BLOB
        assert proxy.seen == [(f"GET http://{host}/v2/r/blobs/{BLOB_DIGEST} HTTP/1.1",
                               "Basic " + base64.b64encode(b"user:p@ss").decode())]
        # TLS through a CONNECT tunnel (to a plain-HTTP server here, so the handshake fails)
        with RegistryClient(host, environ=NO_CONFIG, timeout=10) as client:
            with pytest.raises(EnvironmentFailure, match="TLS"):
                client.fetch_bytes("r", BLOB_DIGEST, len(BLOB))
        assert proxy.seen[1] == (f"CONNECT {host} HTTP/1.0", None)
        # NO_PROXY and loopback hosts go direct
        monkeypatch.setenv("no_proxy", address)
        with RegistryClient(host, insecure=True, environ=NO_CONFIG) as client:
            assert client.fetch_bytes("r", BLOB_DIGEST, len(BLOB)) == BLOB
        monkeypatch.delenv("no_proxy")
        with RegistryClient(fake.host, environ=NO_CONFIG) as client:
            assert client.fetch_bytes("r", BLOB_DIGEST, len(BLOB)) == BLOB
        assert len(proxy.seen) == 2
    monkeypatch.setenv("https_proxy", "https://proxy.example:3128")
    with RegistryClient("registry.example", environ=NO_CONFIG) as client:
        with pytest.raises(UsageError, match="only an http:// proxy"):
            client.blob_size("r", BLOB_DIGEST)
