"""The OCI distribution protocol, as much of it as isep needs: references (oci://HOST/REPO:TAG), manifests,
blobs pushed by chunked resumable upload or cross-repository mount, and blobs fetched with resumable
ranged GETs, verified before they are renamed into place. Memory stays flat: blobs stream between
files and sockets in blocks. References: isep/registryref.py; authentication: isep/registryauth.py;
HTTP and TLS: isep/registryhttp.py."""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import time
from dataclasses import dataclass
from typing import IO, Callable, Iterator, Mapping, Optional, Sequence, TypeVar
from urllib.parse import quote, urljoin

from .errors import BadInput, BlobUnknown, EnvironmentFailure, IntegrityError, IsepError, UsageError, os_error
from .registryauth import Authorizer
from .registryhttp import Body, Http, NetworkError, origin
from .registryref import SCHEME, RegistryRef, check_digest, check_repository, is_registry_ref

__all__ = ["DOCKER_MANIFEST", "DOCKER_MANIFEST_LIST", "MANIFEST_LIMIT", "OCI_INDEX", "OCI_MANIFEST", "SCHEME",
           "RegistryClient", "RegistryRef", "check_digest", "check_repository", "is_registry_ref"]
T = TypeVar("T")

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_ACCEPT = ", ".join((OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST))
MANIFEST_LIMIT = 4 << 20  # distribution refuses larger manifests
UPLOAD_CHUNK = 128 << 20  # one PATCH; larger chunks push faster here (bench/RESULTS.md, "Registry")
READ_BLOCK = 1 << 20
RETRIES = 5  # dropped connections tolerated per blob, each one resumed where it stopped
def _pull(repository: str) -> list[str]:
    check_repository(repository)
    return [f"repository:{repository}:pull"]


def _push(repository: str) -> list[str]:
    check_repository(repository)
    return [f"repository:{repository}:pull,push"]


def _registry_message(body: bytes) -> str:
    """The first error of a registry's JSON error body, printable and short."""
    try:
        first = json.loads(body)["errors"][0]
        text = f"{first.get('code', '')}: {first.get('message', '')}"
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return ""
    return "".join(c if c.isprintable() else "?" for c in text)[:200]


class _Window:
    """LENGTH bytes of a file from its current position, as a body http.client streams in blocks; each
    block counted as it goes (a chunk is 128 MiB: too coarse a step for a progress bar)."""

    def __init__(self, f: IO[bytes], length: int, progress: Optional[Callable[[int], None]]):
        self.f = f
        self.left = length
        self.progress = progress

    def read(self, size: int = -1) -> bytes:
        size = self.left if size < 0 else min(size, self.left)
        data = self.f.read(size)
        self.left -= len(data)
        if self.progress and data:
            self.progress(len(data))
        return data


@dataclass
class _Site:
    """A registry the client talks to: the registry itself, or a mirror tried first for reads."""

    host: str
    origin: str
    auth: Authorizer
    mirror: bool = False


class RegistryClient:
    """One registry (and optionally a mirror for reads). Network failures, refused credentials and an
    unreachable host are EnvironmentFailure (exit 3); an unknown repository or tag UsageError (2); a
    malformed or oversized manifest BadInput (4); a digest or size mismatch IntegrityError (5)."""

    def __init__(self, host: str, *, insecure: bool = False, mirror: Optional[str] = None,
                 timeout: float = 60.0, progress: Optional[Callable[[int], None]] = None,
                 environ: Optional[Mapping[str, str]] = None):
        self.host = host
        self.http = Http(timeout, insecure)
        self.progress = progress
        self.site = _Site(host, origin(host, insecure), Authorizer(host, self.http, environ))
        self.mirror: Optional[_Site] = None
        if mirror:
            mirror_origin = origin(mirror, insecure)
            mirror_host = mirror_origin.split("://", 1)[1]
            self.mirror = _Site(mirror_host, mirror_origin, Authorizer(mirror_host, self.http, environ), True)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- requests ---------------------------------------------------------------------------------------

    def _request(self, site: _Site, method: str, path: str, scopes: Sequence[str],
                 headers: Optional[Mapping[str, str]] = None, body: Body = None,
                 follow: bool = False) -> tuple[http.client.HTTPResponse, str]:
        """One request, retried once after a 401 with what its challenge asks for. PATH is a path on the
        site or a full URL (an upload's Location). A file body must not meet a first 401: the request
        that opens an upload has the header ready by then."""
        url = path if "://" in path else site.origin + path
        for attempt in (0, 1):
            sent = dict(headers or {})
            authorization = site.auth.header(scopes)
            if authorization:
                sent["Authorization"] = authorization
            if follow:
                response, answered = self.http.follow(method, url, sent)
            else:
                response, answered = self.http.send(method, url, sent, body), url
            if response.status != 401 or attempt or hasattr(body, "read"):
                return response, answered
            challenge = response.getheader("WWW-Authenticate")
            self.http.release(response, answered)
            site.auth.answer(challenge, scopes)
        raise AssertionError("unreachable")

    def _unexpected(self, site: _Site, response: http.client.HTTPResponse, url: str, what: str) -> IsepError:
        body = self.http.release(response, url)
        if response.status in (401, 403):
            return site.auth.refused()
        message = _registry_message(body)
        return EnvironmentFailure(f"registry {site.host}: {what}: HTTP {response.status}"
                                  + (f" ({message})" if message else ""))

    def _read_sites(self, by_digest: bool = True) -> list[_Site]:
        return [self.mirror, self.site] if self.mirror and by_digest else [self.site]

    def _read_limited(self, site: _Site, response: http.client.HTTPResponse, url: str, limit: int,
                      what: str) -> bytes:
        if response.length is not None and response.length > limit:
            self.http.release(response, url, 0)
            raise BadInput(f"registry {site.host}: {what} is {response.length} bytes, over the limit of {limit}")
        try:
            body = response.read(limit + 1)
        except (OSError, http.client.HTTPException) as exc:
            self.http.drop(url)
            raise NetworkError(f"registry {site.host}: {what}: the connection dropped") from exc
        if len(body) > limit:
            self.http.release(response, url, 0)
            raise BadInput(f"registry {site.host}: {what} is over the limit of {limit} bytes")
        return body

    def _from_sites(self, by_digest: bool, read: Callable[[_Site], T]) -> T:
        """READ from the mirror first (any failure there falls back to the registry), then the registry."""
        for site in self._read_sites(by_digest):
            try:
                return read(site)
            except IsepError:
                if not site.mirror:
                    raise
        raise AssertionError("unreachable")

    # -- manifests --------------------------------------------------------------------------------------

    def get_manifest(self, repository: str, reference: str) -> tuple[bytes, str]:
        """The manifest's bytes and their digest. A digest reference is checked against the bytes."""
        by_digest = reference.startswith("sha256:")
        if by_digest:
            check_digest(reference)

        def read(site: _Site) -> tuple[bytes, str]:
            path = f"/v2/{repository}/manifests/{quote(reference)}"
            response, url = self._request(site, "GET", path, _pull(repository), {"Accept": MANIFEST_ACCEPT})
            name = f"{SCHEME}{self.host}/{repository}" + ("@" if by_digest else ":") + reference
            if response.status == 404:
                self.http.release(response, url)
                raise UsageError(f"{name}: no such manifest in the registry (unknown repository, tag or digest)")
            if response.status != 200:
                raise self._unexpected(site, response, url, f"manifest {name}")
            body = self._read_limited(site, response, url, MANIFEST_LIMIT, f"the manifest of {name}")
            digest = "sha256:" + hashlib.sha256(body).hexdigest()
            claimed = response.getheader("Docker-Content-Digest") or ""
            if by_digest and digest != reference or claimed.startswith("sha256:") and claimed != digest:
                raise IntegrityError(f"registry {site.host}: the manifest of {name} has sha256 {digest}, "
                                     f"not {reference if by_digest else claimed}")
            return body, digest

        return self._from_sites(by_digest, read)

    def put_manifest(self, repository: str, tag: str, body: bytes, media_type: str = OCI_MANIFEST) -> str:
        if len(body) > MANIFEST_LIMIT:
            raise BadInput(f"a manifest of {len(body)} bytes is over the registry limit of {MANIFEST_LIMIT}")
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        path = f"/v2/{repository}/manifests/{quote(tag)}"
        response, url = self._request(self.site, "PUT", path, _push(repository), {"Content-Type": media_type}, body)
        if response.status == 400:
            message = _registry_message(self.http.release(response, url))
            raise BadInput(f"registry {self.host}: refused the manifest for {repository}:{tag}"
                           + (f" ({message})" if message else ""))
        if response.status != 201:
            raise self._unexpected(self.site, response, url, f"pushing the manifest {repository}:{tag}")
        self.http.release(response, url)
        return digest

    # -- blobs: push ------------------------------------------------------------------------------------

    def blob_size(self, repository: str, digest: str) -> Optional[int]:
        check_digest(digest)
        path = f"/v2/{repository}/blobs/{digest}"
        response, url = self._request(self.site, "HEAD", path, _pull(repository), follow=True)
        if response.status == 404:
            self.http.release(response, url)
            return None
        if response.status != 200:
            raise self._unexpected(self.site, response, url, f"blob {digest}")
        self.http.release(response, url)
        return int(response.getheader("Content-Length") or 0)

    def _start_upload(self, repository: str, query: str = "",
                      scopes: Sequence[str] = ()) -> tuple[int, Optional[str]]:
        path = f"/v2/{repository}/blobs/uploads/{query}"
        response, url = self._request(self.site, "POST", path, list(scopes) or _push(repository))
        if response.status not in (201, 202):
            raise self._unexpected(self.site, response, url, f"starting an upload to {repository}")
        self.http.release(response, url)
        location = response.getheader("Location")
        if response.status == 202 and not location:
            raise EnvironmentFailure(f"registry {self.host}: an upload started without a Location")
        return response.status, urljoin(url, location) if location else None

    def mount_blob(self, repository: str, digest: str, from_repository: str) -> bool:
        check_digest(digest)
        scopes = _push(repository) + _pull(from_repository)
        status, location = self._start_upload(repository, f"?mount={digest}&from={quote(from_repository)}", scopes)
        if status == 202 and location:
            self._cancel_upload(repository, location)
        return status == 201

    def _cancel_upload(self, repository: str, location: str) -> None:
        try:
            response, url = self._request(self.site, "DELETE", location, _push(repository))
            self.http.release(response, url)
        except EnvironmentFailure:
            pass  # an abandoned upload is purged by the registry in time

    def push_bytes(self, repository: str, digest: str, data: bytes) -> str:
        check_digest(digest)
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise IntegrityError(f"the bytes to push as {digest} have another sha256")
        if self.blob_size(repository, digest) is not None:
            return "present"
        _, location = self._start_upload(repository)
        assert location
        self._finish_upload(repository, digest, location, data)
        return "uploaded"

    def push_blob(self, repository: str, digest: str, size: int, path: str,
                  *, mount_from: Sequence[str] = ()) -> str:
        """'present', 'mounted' or 'uploaded'. The upload goes in PATCH chunks of UPLOAD_CHUNK bytes and
        resumes after a dropped connection where the registry says it stands."""
        check_digest(digest)
        if self.blob_size(repository, digest) is not None:
            return "present"
        for source in mount_from:
            if source != repository and self.mount_blob(repository, digest, source):
                return "mounted"
        try:
            f = open(path, "rb")
        except OSError as exc:
            raise os_error(exc, f"reading {path}") from exc
        with f:
            self._upload(repository, digest, size, f)
        return "uploaded"

    def _upload(self, repository: str, digest: str, size: int, f: IO[bytes]) -> None:
        _, started = self._start_upload(repository)
        assert started
        location: Optional[str] = started
        offset = failures = 0
        while True:
            try:
                if location is None:  # after a drop: the answer to the final PUT may be what was lost
                    if self.blob_size(repository, digest) is not None:
                        return
                    started, offset = self._upload_status(repository, started)
                    location = started
                while offset < size:
                    length = min(UPLOAD_CHUNK, size - offset)
                    f.seek(offset)
                    location = started = self._patch(repository, location, f, offset, length)
                    offset += length
                self._finish_upload(repository, digest, location, b"")
                return
            except NetworkError:
                failures += 1
                if failures > RETRIES:
                    raise
                time.sleep(0.2 * failures)
                location = None

    def _patch(self, repository: str, location: str, f: IO[bytes], offset: int, length: int) -> str:
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(length),
                   "Content-Range": f"{offset}-{offset + length - 1}"}
        response, url = self._request(self.site, "PATCH", location, _push(repository), headers,
                                      _Window(f, length, self.progress))
        if response.status == 202 and response.getheader("Location"):
            self.http.release(response, url)
            return urljoin(url, response.getheader("Location") or "")
        if response.status in (401, 416):
            # a token that expired during a long upload, or an offset the registry does not hold: ask
            # where the upload stands (with a fresh token) and go on from there
            challenge = response.getheader("WWW-Authenticate")
            self.http.release(response, url)
            if response.status == 401:
                self.site.auth.answer(challenge, _push(repository))
            raise NetworkError(f"registry {self.host}: upload chunk refused with HTTP {response.status}")
        raise self._unexpected(self.site, response, url, f"uploading to {repository}")

    def _upload_status(self, repository: str, location: str) -> tuple[str, int]:
        """Where an interrupted upload stands: (its URL, the offset to go on from). An upload the registry
        has dropped (it cancels one whose file grew past its last chunk) starts anew from 0."""
        response, url = self._request(self.site, "GET", location, _push(repository))
        held = response.getheader("Range") or ""
        self.http.release(response, url)
        match = re.fullmatch(r"0-(\d+)", held)
        if response.status == 204 and match and response.getheader("Location"):
            end = int(match.group(1))
            return urljoin(url, response.getheader("Location") or ""), end + 1 if end else 0
        if response.status in (401, 403):
            raise self.site.auth.refused()
        _, fresh = self._start_upload(repository)
        assert fresh
        return fresh, 0

    def _finish_upload(self, repository: str, digest: str, location: str, data: bytes) -> None:
        url = location + ("&" if "?" in location else "?") + f"digest={digest}"
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(len(data))}
        response, answered = self._request(self.site, "PUT", url, _push(repository), headers, data)
        if response.status == 400:
            message = _registry_message(self.http.release(response, answered))
            raise IntegrityError(f"registry {self.host}: refused the upload of {digest}"
                                 + (f" ({message})" if message else "") + ": the file changed or is not that blob")
        if response.status != 201:
            raise self._unexpected(self.site, response, answered, f"finishing the upload of {digest}")
        self.http.release(response, answered)

    # -- blobs: fetch -----------------------------------------------------------------------------------

    def fetch_bytes(self, repository: str, digest: str, limit: int) -> bytes:
        check_digest(digest)

        def read(site: _Site) -> bytes:
            response, url = self._request(site, "GET", f"/v2/{repository}/blobs/{digest}", _pull(repository),
                                          follow=True)
            if response.status == 404:
                self.http.release(response, url)
                raise BlobUnknown(f"registry {site.host}: blob {digest} of {repository} is missing")
            if response.status != 200:
                raise self._unexpected(site, response, url, f"blob {digest}")
            data = self._read_limited(site, response, url, limit, f"blob {digest}")
            if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
                raise IntegrityError(f"registry {site.host}: blob {digest} of {repository} has another sha256")
            return data

        return self._from_sites(True, read)

    def fetch_blob(self, repository: str, digest: str, size: int, dest: str) -> int:
        """Stream a blob into DEST + '.partial' (resuming what an earlier call left there), check its
        size and sha256, rename it to DEST. Returns the bytes transferred by this call. On a mismatch
        the partial file is removed and IntegrityError raised."""
        check_digest(digest)
        check_repository(repository)
        partial = dest + ".partial"
        moved = 0

        def read(site: _Site) -> int:
            nonlocal moved
            try:
                # never through a link planted in the store: the partial file is isep's own
                descriptor = os.open(partial, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
                with os.fdopen(descriptor, "r+b") as f:
                    download = _Download(f, digest, size)
                    try:
                        self._fetch_into(site, repository, download)
                    except IntegrityError:
                        _remove(partial)
                        raise
                    finally:
                        moved += download.moved
                os.replace(partial, dest)
            except OSError as exc:
                raise os_error(exc, f"writing {partial}") from exc
            return moved

        return self._from_sites(True, read)

    def _fetch_into(self, site: _Site, repository: str, download: _Download) -> None:
        failures = 0
        while True:
            try:
                self._fetch_range(site, repository, download)
                if download.offset >= download.size:
                    break
                raise NetworkError(f"registry {site.host}: the download of {download.digest} ended at byte "
                                   f"{download.offset}")
            except NetworkError:
                failures += 1
                if failures > RETRIES:
                    raise
                time.sleep(0.2 * failures)
        download.f.flush()
        found = "sha256:" + download.hasher.hexdigest()
        if download.offset != download.size or found != download.digest:
            raise IntegrityError(f"registry {site.host}: blob {download.digest} of {repository}: got "
                                 f"{download.offset} bytes with {found}, expected {download.size} bytes")

    def _fetch_range(self, site: _Site, repository: str, download: _Download) -> None:
        """One GET from the download's offset on: 206 appends, 200 starts over (a pull-through cache may
        not honour Range), 416 at the full size means there was nothing left to fetch."""
        digest, offset, size = download.digest, download.offset, download.size
        headers = {"Range": f"bytes={offset}-", "If-Range": f'"{digest}"'} if offset else {}
        response, url = self._request(site, "GET", f"/v2/{repository}/blobs/{digest}", _pull(repository),
                                      headers, follow=True)
        if response.status == 404:
            self.http.release(response, url)
            raise BlobUnknown(f"registry {site.host}: blob {digest} of {repository} is missing")
        if response.status == 416 and offset == size:
            self.http.release(response, url)
            return
        if response.status == 206 and offset:
            expected = f"bytes {offset}-{size - 1}/{size}"
            if (response.getheader("Content-Range") or "").replace("*", str(size)) != expected:
                self.http.release(response, url, 0)
                raise IntegrityError(f"registry {site.host}: blob {digest} answered a Range from {offset} with "
                                     f"Content-Range {response.getheader('Content-Range')!r}")
        elif response.status == 200:
            download.restart()
        else:
            raise self._unexpected(site, response, url, f"blob {digest}")
        self._copy_body(site, response, url, download)

    def _copy_body(self, site: _Site, response: http.client.HTTPResponse, url: str, download: _Download) -> None:
        buffer = bytearray(READ_BLOCK)
        view = memoryview(buffer)
        while True:
            try:
                count = response.readinto(buffer)
            except (OSError, http.client.HTTPException) as exc:
                self.http.drop(url)
                raise NetworkError(f"registry {site.host}: the download dropped at byte {download.offset}") from exc
            if not count:
                break
            if download.offset + count > download.size:
                self.http.release(response, url, 0)
                raise IntegrityError(f"registry {site.host}: blob {download.digest} is longer than "
                                     f"{download.size} bytes")
            download.append(view[:count])
            if self.progress:
                self.progress(count)
        if response.length:  # http.client returns a short body when the connection closes early
            self.http.drop(url)
            raise NetworkError(f"registry {site.host}: the download dropped at byte {download.offset}")
        if response.will_close:
            self.http.drop(url)


class _Download:
    """A blob being written to its partial file: what it holds so far, hashed as it grows."""

    def __init__(self, f: IO[bytes], digest: str, size: int):
        self.f = f
        self.digest = digest
        self.size = size
        self.moved = 0
        self.hasher = hashlib.sha256()
        f.seek(0, os.SEEK_END)
        if f.tell() > size:
            f.truncate(0)
        f.seek(0)
        for block in _blocks(f):  # what an earlier call left, read back once
            self.hasher.update(block)
        self.offset = f.tell()

    def restart(self) -> None:
        self.f.seek(0)
        self.f.truncate()
        self.hasher = hashlib.sha256()
        self.offset = 0

    def append(self, data: memoryview) -> None:
        self.f.write(data)
        self.hasher.update(data)
        self.offset += len(data)
        self.moved += len(data)


def _blocks(f: IO[bytes]) -> Iterator[bytes]:
    while True:
        block = f.read(READ_BLOCK)
        if not block:
            return
        yield block


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
