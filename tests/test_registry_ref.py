"""Registry references, the plain-HTTP rule, challenges and credential lookup (no registry needed)."""
from __future__ import annotations

import base64
import json

import pytest

from isep.errors import UsageError
from isep.registry import RegistryClient, RegistryRef, is_registry_ref
from isep.registryauth import Credentials, find_credentials, parse_challenge
from isep.registryhttp import is_loopback, origin, split_host

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize("text, host, repository, tag, digest", [
    ("oci://127.0.0.1:5000/fleet/app1:2", "127.0.0.1:5000", "fleet/app1", "2", None),
    ("oci://registry.example.com/app", "registry.example.com", "app", "latest", None),
    (f"oci://r.example/a/b/c@{DIGEST}", "r.example", "a/b/c", None, DIGEST),
    ("oci://[::1]:5000/x_y.z-w:v1.2-rc_3", "[::1]:5000", "x_y.z-w", "v1.2-rc_3", None),
    ("oci://localhost/a__b/c---d:_", "localhost", "a__b/c---d", "_", None),
])
def test_parse_good(text, host, repository, tag, digest):
    ref = RegistryRef.parse(text)
    assert (ref.host, ref.repository, ref.tag, ref.digest) == (host, repository, tag, digest)
    assert ref.reference == (digest or tag)
    assert RegistryRef.parse(str(ref)) == ref
    assert is_registry_ref(text)


@pytest.mark.parametrize("text", [
    "docker://h/r:t", "h/r:t", "oci://", "oci://host", "oci://host/", "oci:///repo",
    "oci://host/Repo", "oci://host/repo/", "oci://host//repo", "oci://host/-repo", "oci://host/repo-",
    "oci://host/re..po", "oci://host/repo:", "oci://host/repo:-tag", "oci://host/repo:.t", "oci://host/repo:a/b",
    "oci://host/repo:" + "t" * 129, "oci://host/" + "a" * 256, "oci://host/repo@sha256:abc",
    f"oci://host/repo@sha512:{'0' * 128}", f"oci://host/repo@{DIGEST.upper()}", f"oci://host/repo:t@{DIGEST}",
    "oci://user:secret@host/repo", "oci://host:0/r", "oci://host:65536/r", "oci://host:/r", "oci://host:5x/r",
    "oci://ho_st/r", "oci://-host/r", "oci://[zz::1]/r", "oci://[::1]x/r", "oci://host/r t",
    "oci://host/r\n", "oci://host/r\x00", "oci://hóst/r", "oci://host/r?x=1", "oci://host/r#frag",
    "oci://host/../etc:t", "oci://host/r:t:u", "oci://" + "a" * 2000 + "/r",
])
def test_parse_refuses_hostile_refs(text):
    with pytest.raises(UsageError) as caught:
        RegistryRef.parse(text)
    assert "\n" not in str(caught.value) and "secret" not in str(caught.value)


def test_loopback_and_scheme_rules():
    for host in ("127.0.0.1", "127.3.4.5:80", "localhost:5000", "LOCALHOST", "[::1]:5000", "::1"):
        assert is_loopback(host), host
        assert origin(host, False).startswith("http://")
    for host in ("10.0.0.1:5000", "registry.example.com", "[2001:db8::1]:443", "localhost.example.com", "128.0.0.1"):
        assert not is_loopback(host), host
        assert origin(host, False) == f"https://{host}"
        assert origin(host, True) == f"http://{host}"
    assert origin("https://mirror.example:5000", False) == "https://mirror.example:5000"
    assert origin("http://127.0.0.1:5001", False) == "http://127.0.0.1:5001"
    assert origin("http://mirror.example", True) == "http://mirror.example"
    for bad in ("http://mirror.example", "ftp://mirror.example", "https://mirror.example/path", "https://",
                "https://u:secret@mirror.example", "u:secret@mirror.example"):
        with pytest.raises(UsageError):
            origin(bad, False)
    assert split_host("[::1]:5000") == ("::1", 5000)
    assert split_host("h.example:80") == ("h.example", 80)
    assert split_host("h.example") == ("h.example", None)


def test_parse_challenge():
    scheme, params = parse_challenge('Bearer realm="https://auth.example/token",service="registry.example",'
                                     'scope="repository:a/b:pull,push"')
    assert scheme == "bearer"
    assert params == {"realm": "https://auth.example/token", "service": "registry.example",
                      "scope": "repository:a/b:pull,push"}
    assert parse_challenge('Basic realm="x \\"y\\""') == ("basic", {"realm": 'x "y"'})
    assert parse_challenge("") == ("", {})
    assert parse_challenge("Bearer realm=https://a/t, service=s") == ("bearer", {"realm": "https://a/t", "service": "s"})


def write_config(tmp_path, doc) -> dict[str, str]:
    (tmp_path / "config.json").write_text(json.dumps(doc))
    return {"DOCKER_CONFIG": str(tmp_path)}


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_credentials_from_environment_first(tmp_path):
    env = write_config(tmp_path, {"auths": {"h:5000": {"auth": b64("cfg:cfgpw")}}})
    found, _ = find_credentials("h:5000", {**env, "ISEP_REGISTRY_USERNAME": "u", "ISEP_REGISTRY_PASSWORD": "p"})
    assert found == Credentials("u", "p")
    assert "p" not in repr(found).replace("password", "")


@pytest.mark.parametrize("key", ["h:5000", "https://h:5000", "http://h:5000/v1/", "H:5000"])
def test_credentials_from_docker_config(tmp_path, key):
    env = write_config(tmp_path, {"auths": {key: {"auth": b64("user:pa:ss")}}})
    found, _ = find_credentials("h:5000", env)
    assert found is not None and (found.username, found.password) == ("user", "pa:ss")
    assert found.source.endswith("config.json")
    assert find_credentials("other:5000", env)[0] is None


def test_credentials_missing_say_why(tmp_path):
    found, why = find_credentials("h", {"DOCKER_CONFIG": str(tmp_path)})
    assert found is None and "ISEP_REGISTRY_USERNAME" in why
    env = write_config(tmp_path, {"credsStore": "desktop"})
    assert "credential helper" in find_credentials("h", env)[1]
    env = write_config(tmp_path, {"credHelpers": {"h": "ecr-login"}})
    assert "not support" in find_credentials("h", env)[1]
    env = write_config(tmp_path, {"auths": {"h": {"auth": "!!notbase64"}}})
    assert "base64" in find_credentials("h", env)[1]
    env = write_config(tmp_path, ["not", "an", "object"])
    assert find_credentials("h", env)[0] is None


@pytest.mark.parametrize("repository", ["../v2", "a/../../b", "A", "a?x=1", "a#b", "a b", "", "a/", "x" * 256])
def test_client_refuses_hostile_repository_names_before_any_request(repository, tmp_path):
    # port 9 on loopback: nothing listens there, so any request would fail with exit 3, not 2
    with RegistryClient("127.0.0.1:9", environ={"DOCKER_CONFIG": str(tmp_path)}) as client:
        for call in (lambda: client.get_manifest(repository, "1"), lambda: client.blob_size(repository, DIGEST),
                     lambda: client.fetch_blob(repository, DIGEST, 1, str(tmp_path / "out")),
                     lambda: client.mount_blob("ok", DIGEST, repository)):
            with pytest.raises(UsageError):
                call()
    assert list(tmp_path.iterdir()) == []
