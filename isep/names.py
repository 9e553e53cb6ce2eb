"""Image names as Docker normalises them, part file names, and the bundle directory's own file names."""
from __future__ import annotations

import re
from typing import Sequence

from .legacy import chain_ids

BUNDLE_MANIFEST = "isep-bundle.json"
SIGNATURE_FILE = "isep-bundle.json.sig"
ISULA_MANIFEST = "manifest"         # isula-build's manifest, beside the parts
LOCK_FILE = "isep-bundle.lock"
RESERVED_FILE_NAMES = {ISULA_MANIFEST, BUNDLE_MANIFEST, SIGNATURE_FILE, LOCK_FILE}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def split_tag(name: str) -> tuple[str, str]:
    """('repo', 'tag') of a reference; the tag defaults to 'latest'."""
    name = name.split("@", 1)[0]
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        return name[:colon], name[colon + 1:]
    return name, "latest"


def normalize(name: str) -> str:
    """Docker's normal form: 'base:1' -> 'docker.io/library/base:1'."""
    repo, tag = split_tag(name.strip())
    first, _, rest = repo.partition("/")
    if not rest or not ("." in first or ":" in first or first == "localhost"):
        domain, path = "docker.io", repo
    else:
        domain, path = first, rest
    if domain == "docker.io" and "/" not in path:
        path = "library/" + path
    return f"{domain}/{path}:{tag}"


def same_image_name(a: str, b: str) -> bool:
    """True when two names denote one image; podman's 'localhost/' prefix is accepted on either side."""
    na, nb = normalize(a), normalize(b)
    if na == nb:
        return True
    strip = lambda n: n[len("localhost/"):] if n.startswith("localhost/") else n  # noqa: E731
    return normalize(strip(na)) == normalize(strip(nb))


def display_name(image: dict) -> str:
    """How messages name an image of an index, plan or bundle: its first tag, else its config digest."""
    tags = image.get("tags") or []
    return tags[0] if tags else str((image.get("config") or {}).get("digest", "an untagged image"))[:19]


def part_stem(tag: str) -> str:
    """isula-build's '<last path component>_<tag>' of a reference."""
    repo, tagpart = split_tag(tag)
    return f"{repo.rsplit('/', 1)[-1]}_{tagpart}"


def versioned_part_name(file_name: str, role: str, diff_ids: list[str]) -> str:
    """The name a part takes when the store already holds another version under its name (a
    floating tag rebuilt): the first 12 hex digits of its stack's chainID before the
    `_<role>_image` suffix (else before the extension): base_bookworm_3c1f0a9e12b4_base_image.tar.zst."""
    chain = chain_ids(diff_ids)[-1].split(":", 1)[-1][:12] if diff_ids else "empty"
    marker = f"_{role}_image"
    at = file_name.rfind(marker)
    if at < 0:
        at = file_name.find(".") if file_name.find(".") > 0 else len(file_name)
    return f"{file_name[:at]}_{chain}{file_name[at:]}"


def coexisting_name(docs: Sequence[dict | None], part: dict, roles: Sequence[str] = ("base", "lib")) -> str:
    """The file name for a new part of one of ROLES: its planned one, unless one of the store
    manifests DOCS lists another version (other diffIDs) under it; then the chainID-suffixed name
    (versioned_part_name), so that both versions stay in the store and the first keeps its name.
    A pack names so a base or lib rebuilt under its tag; a device keeping a bundle stream
    (stream.keep_received) names so an app released again under a floating tag (app:stable) too:
    its store keeps the release the next delta is made against, and a join by that tag takes the
    newest image (bundle.select_image)."""
    name = part["file"]
    if part["role"] not in roles:
        return name
    for doc in docs:
        old = next((p for p in doc["parts"] if p["file"] == name), None) if doc else None
        if old is not None and old.get("diff_ids") != part["diff_ids"]:
            return versioned_part_name(name, part["role"], part["diff_ids"])
    return name


def follow_renames(images: list[dict], renamed: dict[str, str]) -> None:
    """Images name the parts RENAMED (old name -> new: a part reused, a version beside another) by
    their new names, in `parts` and `app_part`."""
    for image in images:
        image["parts"] = [renamed.get(f, f) for f in image["parts"]]
        if "app_part" in image:
            image["app_part"] = renamed.get(image["app_part"], image["app_part"])


def looks_like_part_file(name: str) -> bool:
    """A file name a part could have (isep's or isula-build's tarballs), not a temporary one."""
    return name.endswith((".tar.zst", ".tar.gz", ".tar")) and not name.startswith(".isep")


def check_file_name(name: object, what: str) -> str | None:
    """Why a name cannot be a part file name in a bundle directory, or None when it can."""
    if not isinstance(name, str) or not name:
        return f"{what}: empty file name"
    if "/" in name or "\\" in name:
        return f"{what}: {name!r} is not a plain file name (contains a path separator)"
    if name in (".", "..") or name.startswith(".isep"):
        return f"{what}: {name!r} is not allowed as a file name"
    if _CONTROL.search(name):
        return f"{what}: {name!r} contains control characters"
    if len(name.encode("utf-8", "surrogateescape")) > 255:
        return f"{what}: file name longer than 255 bytes"
    if name in RESERVED_FILE_NAMES:
        return f"{what}: {name!r} is a reserved bundle file name"
    return None
