"""isep/registry.py against Debian's docker-registry (the registry tier: tests/registry/registry.sh)."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from isep import registry as registry_module
from isep.errors import BadInput, BlobUnknown, EnvironmentFailure, ExitStatus, IntegrityError, UsageError
from isep.registry import MANIFEST_LIMIT, OCI_MANIFEST, RegistryClient
from tests.registry.proxy import CuttingProxy


def blob_file(tmp_path, size: int, name: str = "blob") -> tuple[str, str]:
    """A file of SIZE random bytes and its digest."""
    data = os.urandom(size)
    path = tmp_path / name
    path.write_bytes(data)
    return str(path), "sha256:" + hashlib.sha256(data).hexdigest()


def digest_of(path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            hasher.update(block)
    return "sha256:" + hasher.hexdigest()


def artifact_manifest(config_digest: str, layers: list[tuple[str, int]]) -> bytes:
    return json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": "application/vnd.isep.bundle.v1",
        "config": {"mediaType": "application/vnd.isep.bundle.manifest.v1+json", "digest": config_digest, "size": 2},
        "layers": [{"mediaType": "application/vnd.isep.part.v1.tar+zstd", "digest": d, "size": s} for d, s in layers],
    }).encode()


def test_push_fetch_blob_and_manifest(registry, repository, tmp_path):
    path, digest = blob_file(tmp_path, 3 << 20)
    config = b"{}"
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    with registry.client() as client:
        assert client.blob_size(repository, digest) is None
        assert client.push_blob(repository, digest, 3 << 20, path) == "uploaded"
        assert client.push_blob(repository, digest, 3 << 20, path) == "present"
        assert client.blob_size(repository, digest) == 3 << 20
        assert client.push_bytes(repository, config_digest, config) == "uploaded"
        body = artifact_manifest(config_digest, [(digest, 3 << 20)])
        manifest_digest = client.put_manifest(repository, "1", body)
        assert manifest_digest == "sha256:" + hashlib.sha256(body).hexdigest()
        assert client.get_manifest(repository, "1") == (body, manifest_digest)
        assert client.get_manifest(repository, manifest_digest) == (body, manifest_digest)
        assert client.fetch_bytes(repository, config_digest, 100) == config
        dest = tmp_path / "fetched"
        assert client.fetch_blob(repository, digest, 3 << 20, str(dest)) == 3 << 20
        assert digest_of(dest) == digest
        assert not (tmp_path / "fetched.partial").exists()


def test_empty_blob_and_progress(registry, repository, tmp_path):
    path, digest = blob_file(tmp_path, 0)
    seen = []
    with registry.client(progress=seen.append) as client:
        assert client.push_blob(repository, digest, 0, path) == "uploaded"
        assert client.fetch_blob(repository, digest, 0, str(tmp_path / "out")) == 0
    assert (tmp_path / "out").read_bytes() == b""
    path, digest = blob_file(tmp_path, 5 << 20, "five")
    with registry.client(progress=seen.append) as client:
        client.push_blob(repository, digest, 5 << 20, path)
        client.fetch_blob(repository, digest, 5 << 20, str(tmp_path / "five-out"))
    assert sum(seen) == 2 * (5 << 20)


def test_fetch_bytes_limit_and_digest(registry, repository):
    data = b"x" * 1000
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with registry.client() as client:
        client.push_bytes(repository, digest, data)
        with pytest.raises(BadInput):
            client.fetch_bytes(repository, digest, 999)
        with pytest.raises(IntegrityError):
            client.push_bytes(repository, digest, data + b"!")


def test_mount_across_repositories(registry, repository, tmp_path):
    path, digest = blob_file(tmp_path, 1 << 20)
    other = repository + "-other"
    with registry.client() as client:
        client.push_blob(repository, digest, 1 << 20, path)
        assert client.mount_blob(other + "-direct", digest, repository) is True
        assert client.mount_blob(other + "-none", digest, repository + "-missing") is False
        assert client.push_blob(other, digest, 1 << 20, path, mount_from=[repository + "-missing", repository]) \
            == "mounted"
        assert client.fetch_blob(other, digest, 1 << 20, str(tmp_path / "out")) == 1 << 20


def test_unknown_tag_and_repository_are_usage_errors(registry, repository, tmp_path):
    with registry.client() as client:
        with pytest.raises(UsageError, match="no such manifest"):
            client.get_manifest(repository, "nope")
        with pytest.raises(UsageError):
            client.get_manifest(repository, "sha256:" + "0" * 64)


def test_manifest_over_4_MiB_refused(registry, repository):
    body = b'{"schemaVersion": 2, "pad": "' + b"x" * MANIFEST_LIMIT + b'"}'
    with registry.client() as client, pytest.raises(BadInput, match="limit"):
        client.put_manifest(repository, "big", body)


def test_upload_cut_inside_a_chunk_completes(registry, repository, tmp_path, monkeypatch):
    monkeypatch.setattr(registry_module, "UPLOAD_CHUNK", 1 << 20)
    size = 6 << 20
    path, digest = blob_file(tmp_path, size)
    # the cut falls inside the fourth PATCH body
    with CuttingProxy(registry.host, cut_after=(3 << 20) + (1 << 19), direction="up") as proxy:
        client = RegistryClient(proxy.host, environ=registry.environ())
        assert client.push_blob(repository, digest, size, path) == "uploaded"
        client.close()
    assert proxy.cuts == 1
    # the registry drops an upload whose file grew past its last acknowledged chunk (distribution
    # 2.8 cancels it on resume), and the client starts that upload again: at most one extra pass
    assert proxy.bytes["up"] < 2 * size + (1 << 20)
    with registry.client() as client:
        assert client.fetch_blob(repository, digest, size, str(tmp_path / "out")) == size
    assert digest_of(tmp_path / "out") == digest


def test_upload_cut_between_chunks_resumes_where_it_stood(registry, repository, tmp_path, monkeypatch):
    monkeypatch.setattr(registry_module, "UPLOAD_CHUNK", 1 << 20)
    size = 6 << 20
    path, digest = blob_file(tmp_path, size)
    offsets = []
    status = RegistryClient._upload_status

    def recorded_status(self, *args):
        where = status(self, *args)
        offsets.append(where[1])
        return where

    monkeypatch.setattr(RegistryClient, "_upload_status", recorded_status)
    # HEAD, POST, PATCH, PATCH: the connection closes after the second chunk was acknowledged
    with CuttingProxy(registry.host, cut_after=4, direction="responses") as proxy:
        with RegistryClient(proxy.host, environ=registry.environ()) as client:
            assert client.push_blob(repository, digest, size, path) == "uploaded"
    assert proxy.cuts == 1
    assert offsets[0] == 2 << 20
    # no chunk sent twice (the proxy may count the first block of the PATCH that met the closed connection)
    assert proxy.bytes["up"] < size + (1 << 20)
    with registry.client() as client:
        assert client.fetch_blob(repository, digest, size, str(tmp_path / "out")) == size
    assert digest_of(tmp_path / "out") == digest


def test_fetch_cut_in_the_middle_resumes_with_range(registry, repository, tmp_path):
    size = 8 << 20
    path, digest = blob_file(tmp_path, size)
    with registry.client() as client:
        client.push_blob(repository, digest, size, path)
    with CuttingProxy(registry.host, cut_after=size // 2, direction="down") as proxy:
        with RegistryClient(proxy.host, environ=registry.environ()) as client:
            moved = client.fetch_blob(repository, digest, size, str(tmp_path / "out"))
    assert proxy.cuts == 1
    assert moved == size  # nothing fetched twice: the second GET asked for the rest only
    assert proxy.bytes["down"] < size + (1 << 20)
    assert digest_of(tmp_path / "out") == digest


def test_partial_file_resumes_and_bad_partial_fails_clean(registry, repository, tmp_path):
    size = 4 << 20
    path, digest = blob_file(tmp_path, size)
    data = open(path, "rb").read()
    dest = tmp_path / "out"
    with registry.client() as client:
        client.push_blob(repository, digest, size, path)
        (tmp_path / "out.partial").write_bytes(data[:1000])
        assert client.fetch_blob(repository, digest, size, str(dest)) == size - 1000
        assert dest.read_bytes() == data
        dest.unlink()
        # a partial file holding other bytes: the rest is fetched, the sha256 fails, nothing is left
        (tmp_path / "out.partial").write_bytes(b"\0" * 1000)
        with pytest.raises(IntegrityError) as caught:
            client.fetch_blob(repository, digest, size, str(dest))
        assert caught.value.status == ExitStatus.INTEGRITY
        assert not dest.exists() and not (tmp_path / "out.partial").exists()
        # a partial file that is already whole: verified and renamed, nothing fetched
        (tmp_path / "out.partial").write_bytes(data)
        assert client.fetch_blob(repository, digest, size, str(dest)) == 0
        assert dest.read_bytes() == data


def test_cache_answers_200_to_range_fetch_starts_over(registry, cache_registry, repository, tmp_path):
    size = 4 << 20
    path, digest = blob_file(tmp_path, size)
    data = open(path, "rb").read()
    with registry.client() as client:
        client.push_blob(repository, digest, size, path)
    (tmp_path / "out.partial").write_bytes(data[:size // 2])
    with cache_registry.client() as client:
        assert client.fetch_blob(repository, digest, size, str(tmp_path / "out")) == size
    assert (tmp_path / "out").read_bytes() == data


def test_mirror_is_tried_first_and_falls_back(registry, cache_registry, repository, tmp_path):
    size = 1 << 20
    path, digest = blob_file(tmp_path, size)
    with registry.client() as client:
        client.push_blob(repository, digest, size, path)
    with RegistryClient(registry.host, mirror=cache_registry.host, environ=registry.environ()) as client:
        assert client.fetch_blob(repository, digest, size, str(tmp_path / "out")) == size
    # the cache stores what it passed on after the response: wait for its file
    for _ in range(100):
        if cache_registry.blob_file(digest).exists():
            break
        time.sleep(0.05)
    assert cache_registry.blob_file(digest).exists(), "the blob did not go through the mirror"
    with RegistryClient(registry.host, mirror="127.0.0.1:9", environ=registry.environ()) as client:
        assert client.fetch_blob(repository, digest, size, str(tmp_path / "out2")) == size


def test_tampered_blob_is_integrity_error_and_leaves_no_file(registry, repository, tmp_path):
    size = 2 << 20
    path, digest = blob_file(tmp_path, size)
    with registry.client() as client:
        client.push_blob(repository, digest, size, path)
    stored = registry.blob_file(digest)
    with open(stored, "r+b") as f:
        f.seek(size // 2)
        f.write(b"tampered")
    with registry.client() as client, pytest.raises(IntegrityError):
        client.fetch_blob(repository, digest, size, str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path)) == ["blob"]


def test_deleted_blob_is_blob_unknown(registry, repository, tmp_path):
    path, digest = blob_file(tmp_path, 1000)
    with registry.client() as client:
        client.push_blob(repository, digest, 1000, path)
    request = urllib.request.Request(f"{registry.url}/v2/{repository}/blobs/{digest}", method="DELETE")
    assert urllib.request.urlopen(request).status == 202
    with registry.client() as client, pytest.raises(BlobUnknown, match="missing"):
        client.fetch_blob(repository, digest, 1000, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


@pytest.mark.parametrize("which", ["auth_registry", "token_registry"])
def test_auth_good_bad_missing_credentials(which, request, repository, tmp_path):
    server = request.getfixturevalue(which)
    path, digest = blob_file(tmp_path, 1 << 20)
    with server.client() as client:
        assert client.push_blob(repository, digest, 1 << 20, path) == "uploaded"
        assert client.push_blob(repository + "-b", digest, 1 << 20, path, mount_from=[repository]) == "mounted"
        assert client.fetch_blob(repository, digest, 1 << 20, str(tmp_path / "out")) == 1 << 20
    with server.client(environ=server.environ(password="wrong")) as client:
        with pytest.raises(EnvironmentFailure, match="denied") as caught:
            client.blob_size(repository, digest)
        assert "wrong" not in str(caught.value) and caught.value.status == ExitStatus.ENVIRONMENT
    with RegistryClient(server.host, environ={"DOCKER_CONFIG": str(tmp_path / "none")}) as client:
        with pytest.raises(EnvironmentFailure, match="ISEP_REGISTRY_USERNAME"):
            client.blob_size(repository, digest)


def test_token_cached_per_scope(token_registry, repository, tmp_path):
    realm = json.load(open(os.environ.get("ISEP_REGISTRY_ENV", "/tmp/isep-registry/env.json")))["realm"]["url"]

    def issued() -> int:
        return json.load(urllib.request.urlopen(realm + "/health"))["issued"]

    path, digest = blob_file(tmp_path, 1 << 20)
    before = issued()
    with token_registry.client() as client:
        client.push_blob(repository, digest, 1 << 20, path)
        client.fetch_blob(repository, digest, 1 << 20, str(tmp_path / "out"))
        client.blob_size(repository, digest)
    # one token for pull (HEAD, GET), one for pull,push (the upload)
    assert issued() - before == 2


def test_docker_config_credentials(auth_registry, repository, tmp_path):
    config = tmp_path / "docker"
    config.mkdir()
    auth = base64.b64encode(f"{auth_registry.username}:{auth_registry.password}".encode()).decode()
    (config / "config.json").write_text(json.dumps({"auths": {f"http://{auth_registry.host}": {"auth": auth}}}))
    with RegistryClient(auth_registry.host, environ={"DOCKER_CONFIG": str(config)}) as client:
        assert client.blob_size(repository, "sha256:" + "1" * 64) is None
    (config / "config.json").write_text(json.dumps({"auths": {}, "credsStore": "secretservice"}))
    with RegistryClient(auth_registry.host, environ={"DOCKER_CONFIG": str(config)}) as client:
        with pytest.raises(EnvironmentFailure, match="credential helper"):
            client.blob_size(repository, "sha256:" + "1" * 64)


FLAT_MEMORY = """
import resource, sys
from isep.registry import RegistryClient
host, repository, path, digest, size, dest = sys.argv[1:]
moved = []
with RegistryClient(host, environ={"DOCKER_CONFIG": "/nonexistent"}, progress=moved.append) as client:
    assert client.push_blob(repository, digest, int(size), path) == "uploaded"
    assert client.fetch_blob(repository, digest, int(size), dest) == int(size)
assert sum(moved) == 2 * int(size), sum(moved)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


@pytest.mark.slow
def test_push_and_fetch_in_flat_memory(registry, repository, tmp_path):
    size = 256 << 20
    path = tmp_path / "zeros"
    with open(path, "wb") as f:
        f.truncate(size)
    hasher = hashlib.sha256()
    block = bytes(1 << 20)
    for _ in range(size >> 20):
        hasher.update(block)
    digest = "sha256:" + hasher.hexdigest()
    done = subprocess.run([sys.executable, "-c", FLAT_MEMORY, registry.host, repository, str(path), digest, str(size),
                           str(tmp_path / "out")], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    peak_kib = int(done.stdout.split()[-1])
    # the interpreter and isep's imports take ~20 MiB; a blob held in memory would add 256
    assert peak_kib < 64 << 10, f"peak RSS {peak_kib} KiB for a 256 MiB push and fetch"
    assert (tmp_path / "out").stat().st_size == size
