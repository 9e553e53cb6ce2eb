"""Registry credentials and challenges, as registries and docker do them: anonymous first; on a 401,
Basic, or a bearer token from the challenge's realm (fetched with Basic credentials if any), cached
per scope. Credentials come from ISEP_REGISTRY_USERNAME/ISEP_REGISTRY_PASSWORD or from the docker
config file's `auths` (never written by isep, never printed); docker credential helpers (credsStore,
credHelpers) are not supported."""
from __future__ import annotations

import base64
import binascii
import json
import os
import re
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence
from urllib.parse import urlencode, urlsplit

from .errors import EnvironmentFailure
from .registryhttp import Http

ENV_USERNAME = "ISEP_REGISTRY_USERNAME"
ENV_PASSWORD = "ISEP_REGISTRY_PASSWORD"
TOKEN_LIMIT = 1 << 20
# auth-param = token "=" ( token / quoted-string ), RFC 7235
_PARAM = re.compile(r'\s*([A-Za-z0-9_.!#$%&\'*+^`|~-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^\s,"]*)\s*,?')


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)
    source: str = "the environment"

    def basic(self) -> str:
        return "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()


def docker_config_path(environ: Mapping[str, str]) -> str:
    directory = environ.get("DOCKER_CONFIG") or os.path.join(os.path.expanduser("~"), ".docker")
    return os.path.join(directory, "config.json")


def _config_host(key: str) -> str:
    """An `auths` key as docker writes it ('host', 'https://host', 'https://host/v1/') -> 'host'."""
    if "://" in key:
        key = urlsplit(key).netloc
    return key.split("/", 1)[0].lower()


def find_credentials(host: str, environ: Optional[Mapping[str, str]] = None) -> tuple[Optional[Credentials], str]:
    """The credentials for HOST and, when there are none, a note for the error message (why not)."""
    environ = os.environ if environ is None else environ
    username, password = environ.get(ENV_USERNAME), environ.get(ENV_PASSWORD)
    if username and password is not None:
        return Credentials(username, password), ""
    path = docker_config_path(environ)
    try:
        with open(path, "rb") as f:
            config = json.loads(f.read(TOKEN_LIMIT))
    except (OSError, ValueError):
        return None, f"set {ENV_USERNAME} and {ENV_PASSWORD}"
    if not isinstance(config, dict):
        return None, f"{path} is not a JSON object"
    auths = config.get("auths")
    auths = auths if isinstance(auths, dict) else {}
    for key, entry in auths.items():
        if _config_host(key) == host.lower() and isinstance(entry, dict) and isinstance(entry.get("auth"), str):
            try:
                user, colon, secret = base64.b64decode(entry["auth"], validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return None, f"the auth of {host} in {path} is not base64 of user:password"
            if colon:
                return Credentials(user, secret, path), ""
    if config.get("credsStore") or host.lower() in {_config_host(k) for k in config.get("credHelpers") or {}}:
        return None, (f"{path} names a credential helper, which isep does not support: "
                      f"set {ENV_USERNAME} and {ENV_PASSWORD}")
    return None, f"set {ENV_USERNAME} and {ENV_PASSWORD}, or log in with docker"


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """'Bearer realm="r",service="s"' -> ('bearer', {'realm': 'r', 'service': 's'})."""
    scheme, _, rest = header.strip().partition(" ")
    params: dict[str, str] = {}
    for match in _PARAM.finditer(rest):
        value = match.group(2)
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        params[match.group(1).lower()] = value
    return scheme.lower(), params


class Authorizer:
    """The Authorization header for requests to one registry host, learnt from its challenges."""

    def __init__(self, host: str, http: Http, environ: Optional[Mapping[str, str]] = None):
        self.host = host
        self.http = http
        self.environ = environ
        self._scheme = ""  # "" (anonymous so far), "basic" or "bearer"
        self._bearer: dict[str, str] = {}
        self._tokens: dict[str, str] = {}
        self._credentials: Optional[tuple[Optional[Credentials], str]] = None

    def credentials(self) -> tuple[Optional[Credentials], str]:
        if self._credentials is None:
            self._credentials = find_credentials(self.host, self.environ)
        return self._credentials

    def header(self, scopes: Sequence[str]) -> Optional[str]:
        if self._scheme == "basic":
            found = self.credentials()[0]
            return found.basic() if found else None
        if self._scheme == "bearer":
            token = self._tokens.get(_scope_key(scopes))
            return f"Bearer {token}" if token else None
        return None

    def answer(self, challenge: Optional[str], scopes: Sequence[str]) -> None:
        """Prepare the header for the retry of a request that was answered 401 with CHALLENGE."""
        scheme, params = parse_challenge(challenge or "")
        found, why_not = self.credentials()
        if scheme == "bearer" and params.get("realm"):
            self._scheme = "bearer"
            self._bearer = params
            wanted = list(scopes) + [s for s in params.get("scope", "").split(" ") if s and s not in scopes]
            self._tokens[_scope_key(scopes)] = self._fetch_token(wanted, found)
        elif scheme == "basic":
            if found is None:
                raise EnvironmentFailure(f"registry {self.host}: authentication required ({why_not})")
            self._scheme = "basic"
        else:
            raise EnvironmentFailure(f"registry {self.host}: authentication required with an unsupported "
                                     f"scheme {scheme or 'none'!r}")

    def refused(self) -> EnvironmentFailure:
        found, why_not = self.credentials()
        if found is None:
            return EnvironmentFailure(f"registry {self.host}: access denied to anonymous requests ({why_not})")
        return EnvironmentFailure(f"registry {self.host}: access denied for user {found.username!r} "
                                  f"(credentials from {found.source})")

    def _fetch_token(self, scopes: Sequence[str], found: Optional[Credentials]) -> str:
        realm = self._bearer["realm"]
        query = [("service", self._bearer["service"])] if self._bearer.get("service") else []
        query += [("scope", s) for s in scopes]
        url = realm + ("&" if "?" in realm else "?") + urlencode(query)
        headers = {"Authorization": found.basic()} if found else {}
        response, answered = self.http.follow("GET", url, headers)
        body = self.http.release(response, answered, TOKEN_LIMIT)
        if response.status in (401, 403):
            raise self.refused()
        try:
            doc = json.loads(body) if response.status == 200 and len(body) <= TOKEN_LIMIT else None
            token = doc.get("token") or doc.get("access_token") if isinstance(doc, dict) else None
        except ValueError:
            token = None
        if not isinstance(token, str) or not token:
            raise EnvironmentFailure(f"registry {self.host}: its token server answered {response.status} "
                                     "without a token")
        return token


def _scope_key(scopes: Sequence[str]) -> str:
    return " ".join(sorted(scopes))
