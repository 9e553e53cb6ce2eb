"""A tiny bearer-token server for the registry tier: docker-registry's `auth: token:` points its realm
here. It answers GET /token?service=..&scope=.. with a JWT (RS256, signed by `openssl dgst`, the
self-signed certificate in the x5c header, which the registry trusts through rootcertbundle), granting
every requested action, but only to the one user it was started with and the password in $ISEP_TOKEN_PASSWORD (Basic)."""
from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def cert_der_b64(pem_path: str) -> str:
    lines = open(pem_path).read().split("-----")[2].split()
    return "".join(lines)


def make_token(opts, scopes: list[str], subject: str) -> str:
    access = []
    for scope in scopes:
        kind, _, rest = scope.partition(":")
        name, _, actions = rest.rpartition(":")
        access.append({"type": kind, "name": name, "actions": [a for a in actions.split(",") if a]})
    now = int(time.time())
    header = {"typ": "JWT", "alg": "RS256", "x5c": [cert_der_b64(opts.cert)]}
    claims = {"iss": opts.issuer, "sub": subject, "aud": opts.service, "exp": now + opts.lifetime,
              "nbf": now - 10, "iat": now, "jti": uuid.uuid4().hex, "access": access}
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    signature = subprocess.run(["openssl", "dgst", "-sha256", "-sign", opts.key], input=signing_input.encode(),
                               capture_output=True, check=True).stdout
    return f"{signing_input}.{b64url(signature)}"


class Handler(BaseHTTPRequestHandler):
    opts: argparse.Namespace
    issued = 0

    def log_message(self, *args):
        pass

    def reply(self, status: int, doc: dict, headers: dict[str, str] = {}) -> None:  # noqa: B006
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        url = urlsplit(self.path)
        if url.path == "/health":
            return self.reply(200, {"issued": Handler.issued})
        if url.path != "/token":
            return self.reply(404, {"error": "not found"})
        expected = base64.b64encode(f"{self.opts.user}:{self.opts.password}".encode()).decode()
        if self.headers.get("Authorization", "") != f"Basic {expected}":
            return self.reply(401, {"error": "credentials required"}, {"WWW-Authenticate": 'Basic realm="token"'})
        query = parse_qs(url.query)
        if query.get("service") != [self.opts.service]:
            return self.reply(400, {"error": "unknown service"})
        scopes = [s for value in query.get("scope", []) for s in value.split(" ") if s]
        Handler.issued += 1
        token = make_token(self.opts, scopes, self.opts.user)
        self.reply(200, {"token": token, "access_token": token, "expires_in": self.opts.lifetime})


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("--key", "--cert", "--issuer", "--service", "--user"):
        parser.add_argument(name, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--lifetime", type=int, default=300)
    opts = parser.parse_args()
    opts.password = os.environ["ISEP_TOKEN_PASSWORD"]
    Handler.opts = opts
    ThreadingHTTPServer(("127.0.0.1", opts.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
