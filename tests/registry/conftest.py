"""Fixtures of the registry tier: the registries that tests/registry/registry.sh started (read from
$ISEP_REGISTRY_ENV, else $ISEP_REGISTRY_ROOT/env.json as registry.sh writes it, default
/tmp/isep-registry/env.json). Every test here is marked `registry`. When
the registries are not running the tests skip with the reason, but fail under CI (CI=true) or
ISEP_REGISTRY=1, where tests/run.sh has started them."""
from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest

from isep.registry import RegistryClient

HERE = Path(__file__).parent
ENV_JSON = Path(os.environ.get("ISEP_REGISTRY_ENV")
                or Path(os.environ.get("ISEP_REGISTRY_ROOT", "/tmp/isep-registry")) / "env.json")


def _required() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no") or os.environ.get("ISEP_REGISTRY") == "1"


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.registry)


@dataclass
class Registry:
    """One registry of the tier: host ('127.0.0.1:15000'), url, its storage directory, and for the
    Basic and token ones the test user."""

    name: str
    host: str
    url: str
    storage: Path
    username: Optional[str] = None
    password: Optional[str] = field(default=None, repr=False)

    def environ(self, username: Optional[str] = None, password: Optional[str] = None) -> dict[str, str]:
        """An environment holding (these or) the registry's credentials and no docker config."""
        env = {"DOCKER_CONFIG": "/nonexistent-isep-test"}
        user, secret = username or self.username, password or self.password
        if user is not None and secret is not None:
            env.update(ISEP_REGISTRY_USERNAME=user, ISEP_REGISTRY_PASSWORD=secret)
        return env

    def client(self, **options) -> RegistryClient:
        options.setdefault("environ", self.environ())
        return RegistryClient(self.host, **options)

    def blob_file(self, digest: str) -> Path:
        hex_digest = digest.split(":", 1)[1]
        return self.storage / "docker/registry/v2/blobs/sha256" / hex_digest[:2] / hex_digest / "data"


def _registry(name: str) -> Registry:
    if not ENV_JSON.exists():
        reason = f"the registry tier is not running ({ENV_JSON} missing): bash tests/registry/registry.sh start"
        pytest.fail(reason) if _required() else pytest.skip(reason)
    entry = json.loads(ENV_JSON.read_text())[name]
    try:
        urllib.request.urlopen(entry["url"] + "/v2/", timeout=5).close()
    except urllib.error.HTTPError:
        pass  # 401 from the registries with auth: up
    except OSError as exc:
        reason = f"registry {name} at {entry['url']} does not answer ({exc}): bash tests/registry/registry.sh start"
        pytest.fail(reason) if _required() else pytest.skip(reason)
    return Registry(name, entry["host"], entry["url"], Path(entry["storage"]), entry.get("username"),
                    entry.get("password"))


@pytest.fixture(scope="session")
def registry() -> Registry:
    """The open registry (no auth, delete enabled)."""
    return _registry("open")


@pytest.fixture(scope="session")
def auth_registry() -> Registry:
    """A registry with Basic auth (htpasswd); .username/.password are the test user's."""
    return _registry("auth")


@pytest.fixture(scope="session")
def token_registry() -> Registry:
    """A registry with bearer-token auth; the realm is tests/registry/token_server.py (Basic for a token)."""
    return _registry("token")


@pytest.fixture(scope="session")
def cache_registry(registry) -> Registry:
    """A pull-through cache (proxy.remoteurl) in front of the open registry."""
    return _registry("cache")


@pytest.fixture
def repository() -> str:
    """A repository name no other test uses."""
    return f"isep-test/{uuid.uuid4().hex[:12]}"
