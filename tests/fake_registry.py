"""An in-memory stand-in for isep.registry.RegistryClient (the fast tier needs no registry): blobs
and manifests per repository, with the client's contract (outcomes, checks, errors), counting what
crosses."""
from __future__ import annotations

import hashlib
import os
from typing import Optional, Sequence

from isep.errors import BadInput, BlobUnknown, IntegrityError, UsageError


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class FakeRegistry:
    """The registry's state, shared by every FakeClient made on it."""

    def __init__(self) -> None:
        self.blobs: dict[str, dict[str, bytes]] = {}       # repository -> digest -> bytes
        self.manifests: dict[str, dict[str, bytes]] = {}   # repository -> digest -> body
        self.tags: dict[str, dict[str, str]] = {}          # repository -> tag -> digest
        self.fetched: list[tuple[str, int]] = []           # (digest, bytes) per blob GET
        self.manifest_puts = 0

    def client(self, host: str = "fake", **_ignored) -> FakeClient:
        return FakeClient(self)

    def delete_blob(self, digest: str) -> None:  # what a garbage collection does
        for blobs in self.blobs.values():
            blobs.pop(digest, None)


class FakeClient:
    def __init__(self, registry: FakeRegistry):
        self.r = registry

    def get_manifest(self, repository: str, reference: str) -> tuple[bytes, str]:
        digest = reference if reference.startswith("sha256:") else self.r.tags.get(repository, {}).get(reference)
        body = self.r.manifests.get(repository, {}).get(digest or "")
        if body is None:
            raise UsageError(f"no manifest {repository}:{reference}")
        if len(body) > 4 << 20:
            raise BadInput("manifest over 4 MiB")
        return body, digest_of(body)

    def put_manifest(self, repository: str, tag: str, body: bytes, media_type: str = "") -> str:
        digest = digest_of(body)
        self.r.manifests.setdefault(repository, {})[digest] = body
        self.r.tags.setdefault(repository, {})[tag] = digest
        self.r.manifest_puts += 1
        return digest

    def blob_size(self, repository: str, digest: str) -> Optional[int]:
        data = self.r.blobs.get(repository, {}).get(digest)
        return None if data is None else len(data)

    def mount_blob(self, repository: str, digest: str, from_repository: str) -> bool:
        data = self.r.blobs.get(from_repository, {}).get(digest)
        if data is None:
            return False
        self.r.blobs.setdefault(repository, {})[digest] = data
        return True

    def push_blob(self, repository: str, digest: str, size: int, path: str, *, mount_from: Sequence[str] = ()) -> str:
        if self.blob_size(repository, digest) is not None:
            return "present"
        if any(self.mount_blob(repository, digest, source) for source in mount_from):
            return "mounted"
        with open(path, "rb") as fh:
            data = fh.read()
        if digest_of(data) != digest or len(data) != size:
            raise IntegrityError(f"upload of {path}: digest mismatch")
        self.r.blobs.setdefault(repository, {})[digest] = data
        return "uploaded"

    def push_bytes(self, repository: str, digest: str, data: bytes) -> str:
        if self.blob_size(repository, digest) is not None:
            return "present"
        self.r.blobs.setdefault(repository, {})[digest] = data
        return "uploaded"

    def fetch_blob(self, repository: str, digest: str, size: int, dest: str) -> int:
        data = self._blob(repository, digest)
        partial = dest + ".partial"
        have = os.path.getsize(partial) if os.path.exists(partial) else 0
        with open(partial, "ab") as fh:
            fh.write(data[have:])
        self.r.fetched.append((digest, len(data) - have))
        with open(partial, "rb") as fh:
            got = fh.read()
        if len(got) != size or digest_of(got) != digest:
            os.unlink(partial)
            raise IntegrityError(f"blob {digest}: size or sha256 mismatch")
        os.replace(partial, dest)
        return len(data) - have

    def fetch_bytes(self, repository: str, digest: str, limit: int) -> bytes:
        data = self._blob(repository, digest)
        if len(data) > limit:
            raise BadInput(f"blob {digest} over {limit} bytes")
        if digest_of(data) != digest:
            raise IntegrityError(f"blob {digest}: sha256 mismatch")
        self.r.fetched.append((digest, len(data)))
        return data

    def _blob(self, repository: str, digest: str) -> bytes:
        data = self.r.blobs.get(repository, {}).get(digest)
        if data is None:
            raise BlobUnknown(f"blob {digest} not found in {repository}")
        return data
