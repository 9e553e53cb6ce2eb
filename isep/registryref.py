"""oci:// references: oci://HOST[:PORT]/REPO[:TAG|@sha256:HEX], checked as untrusted input (a bad one is
a usage error that never echoes credentials)."""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Optional

from .errors import UsageError
from .fields import DIGEST

SCHEME = "oci://"

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")


def is_registry_ref(text: str) -> bool:
    return text.startswith(SCHEME)


def _check_host(host: str, text: str) -> None:
    name, port = host, ""
    if host.startswith("["):
        name, _, rest = host[1:].partition("]")
        if rest and not rest.startswith(":"):
            raise UsageError(f"{text}: bad registry host {host!r}")
        port = rest[1:]
        try:
            ipaddress.IPv6Address(name)
        except ValueError:
            raise UsageError(f"{text}: bad IPv6 address {name!r}") from None
    else:
        name, colon, port = host.partition(":")
        if colon and not port or not _HOSTNAME.fullmatch(name):
            raise UsageError(f"{text}: bad registry host {host!r}")
    if port and not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise UsageError(f"{text}: bad port {port!r}")


@dataclass(frozen=True)
class RegistryRef:
    """oci://HOST[:PORT]/REPO[:TAG|@sha256:HEX]; TAG is "latest" when neither is given."""

    host: str
    repository: str
    tag: Optional[str]
    digest: Optional[str]

    @classmethod
    def parse(cls, text: str) -> RegistryRef:
        if not is_registry_ref(text):
            raise UsageError(f"{text!r}: a registry reference starts with {SCHEME}")
        if len(text) > 1024 or not text.isascii() or not text.isprintable() or " " in text:
            raise UsageError(f"{text[:80]!r}: not a registry reference (oci://HOST[:PORT]/REPO[:TAG|@sha256:HEX])")
        host, slash, rest = text[len(SCHEME):].partition("/")
        if "@" in host:  # user:password@host: not echoed, credentials come from the environment
            raise UsageError("a registry reference names no user (credentials: ISEP_REGISTRY_USERNAME and "
                             "ISEP_REGISTRY_PASSWORD, or the docker config file)")
        if not slash:
            raise UsageError(f"{text}: give oci://HOST[:PORT]/REPO[:TAG|@sha256:HEX]")
        _check_host(host, text)
        rest, at, digest = rest.partition("@")
        repository, colon, tag = rest.partition(":")
        if at and colon:
            raise UsageError(f"{text}: give a tag or a digest, not both")
        if at and not DIGEST.fullmatch(digest):
            raise UsageError(f"{text}: a digest is sha256: and 64 lower-case hex digits")
        if colon and not _TAG.fullmatch(tag):
            raise UsageError(f"{text}: bad tag {tag!r} (letters, digits, _ . -, at most 128, not first . or -)")
        if len(repository) > 255 or not _REPOSITORY.fullmatch(repository):
            raise UsageError(f"{text}: bad repository {repository!r} (lower-case letters and digits, "
                             "separated by / . _ -)")
        return cls(host, repository, None if at else (tag if colon else "latest"), digest if at else None)

    @property
    def reference(self) -> str:
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        return f"{SCHEME}{self.host}/{self.repository}" + (f"@{self.digest}" if self.digest else f":{self.tag}")


def check_digest(digest: str) -> None:
    if not DIGEST.fullmatch(digest):
        raise UsageError(f"{digest!r} is not a sha256 digest")


def check_repository(repository: str) -> None:
    """A repository name as distribution accepts it (it goes into URL paths)."""
    if len(repository) > 255 or not _REPOSITORY.fullmatch(repository):
        raise UsageError(f"{repository[:80]!r} is not a repository name (lower-case letters and digits, "
                         "separated by / . _ -)")
