"""Synthetic `docker save`-style image archives, faithful to real producers.

Pure Python, deterministic for a given seed, streaming (an archive is never
built in memory; lazily generated layers are produced in 1 MiB chunks).

Formats (see /work/shared/docs/archive-formats.md):

* ``docker-legacy``  dockerd <= 24, graph drivers: ``<v1id>/{VERSION,json,layer.tar}``
  with Docker's own v1 ids, symlink ``../<v1id>/layer.tar`` for a repeated diffID,
  ``<cfg>.json``, ``manifest.json``, ``repositories``; lexical (WalkDir) order,
  modes with file-type bits (0o40755/0o100644/0o120777), uname/gname ``root``.
* ``docker-oci``     dockerd 25+ (graph drivers): ``blobs/sha256/*`` (uncompressed layers
  named by diffID, config, OCI manifest, legacy v1-json blobs), ``index.json``,
  ``manifest.json`` with ``LayerSources``, ``oci-layout`` (with the space),
  ``repositories``; lexical order.
* ``docker-cstore``  Docker with the containerd image store: gzip layer blobs, nested
  image index blob (+ BuildKit provenance attestation manifest), mode 0444, mtime 0,
  no ``repositories``, ``oci-layout`` without the space.
* ``podman``         containers/image docker-archive: ``<diffid>.tar`` layers first,
  ``<cfg>.json``, ``<v1id>/layer.tar`` symlinks -> ``../<diffid>.tar`` + VERSION + json,
  ``manifest.json`` (fully qualified RepoTags) and ``repositories`` last; 0444, mtime 0.
* ``oci-archive``    podman ``--format oci-archive``: gzip blobs, ``index.json`` with the
  full ref name, ``oci-layout``, no ``manifest.json``.

Every tar header is written the way Go's ``archive/tar`` writes it with
``Format = FormatPAX`` (ustar header, prefix split for long names when possible,
``PaxHeaders.0/<name>`` extended header records only when a field does not fit),
and every archive ends with exactly two zero blocks (no record padding).
"""

from __future__ import annotations

import hashlib
import json
import random
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator, TypedDict

from .archive import FORMATS as FORMAT_DESCRIPTIONS
from .legacy import chain_ids, gojson, podman_v1_from_config
from .legacy import sorted_map as _sorted_map

__all__ = [
    "FORMATS",
    "Layer",
    "LazyContent",
    "Image",
    "sample_images",
    "write_archive",
    "diff_ids",
    "chain_ids",
    "inspect_json",
    "config_bytes",
    "config_digest",
    "write_sample_set",
    "big_image",
    "big_image_family",
    "write_huge_member_archive",
    "layer_paths",
    "archive_members",
    "image_id",
    "layer_tar_size",
    "iter_layer_tar",
    "tar_header",
    "EMPTY_LAYER_DIFFID",
]

FORMATS = tuple(FORMAT_DESCRIPTIONS)  # the producer formats isep reads, each made faithfully here

CHUNK = 1 << 20
BLOCK = 512
EMPTY_LAYER_DIFFID = "sha256:5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef"
# Go compress/gzip output for the 1024-byte empty tar (containerd / BuildKit), copied from
# tests/data/real/docker-cstore: sha256:4f4fb700ef54461cfa02571ae0db9a0dc1e0cdb5577484a6d75e68dc38e8acc1
_EMPTY_LAYER_GZIP = bytes.fromhex("1f8b08000000000000ff621805a360148c5800080000ffff2eafb5ef00040000")

MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
MT_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"

_ZERO_CHUNK = bytes(CHUNK)


# --------------------------------------------------------------------------------------
# Go-compatible JSON and tar headers
# --------------------------------------------------------------------------------------

def _octal(value: int, width: int) -> bytes:
    """Go formatOctal: zero padded, NUL terminated; 0 if it does not fit."""
    if value < 0 or value >= 8 ** (width - 1):
        value = 0
    return b"%0*o\0" % (width - 1, value)


def _put(buf: bytearray, off: int, width: int, s: bytes) -> None:
    s = s[:width]
    buf[off:off + len(s)] = s


def _split_ustar_path(name: bytes):
    # Go archive/tar splitUSTARPath
    length = len(name)
    if length <= 100 or not name.isascii():
        return None
    if length > 156:
        length = 156
    elif name[length - 1:length] == b"/":
        length -= 1
    i = name.rfind(b"/", 0, length)
    nlen = len(name) - i - 1
    plen = i
    if i <= 0 or nlen > 100 or nlen == 0 or plen > 155:
        return None
    return name[:i], name[i + 1:]


def _pax_record(key: str, value: str) -> bytes:
    body = f" {key}={value}\n".encode()
    n = len(body) + 1
    while len(str(n).encode()) + len(body) != n:
        n = len(str(n).encode()) + len(body)
    return str(n).encode() + body


def _block(name: bytes, mode: int, uid: int, gid: int, size_field: int, mtime: int,
           typeflag: bytes, linkname: bytes, uname: bytes, gname: bytes,
           prefix: bytes = b"", devnums: bool = True) -> bytes:
    b = bytearray(BLOCK)
    _put(b, 0, 100, name)
    b[100:108] = _octal(mode, 8)
    b[108:116] = _octal(uid, 8)
    b[116:124] = _octal(gid, 8)
    b[124:136] = _octal(size_field, 12)
    b[136:148] = _octal(mtime, 12)
    b[156:157] = typeflag
    _put(b, 157, 100, linkname)
    b[257:263] = b"ustar\0"
    b[263:265] = b"00"
    _put(b, 265, 32, uname)
    _put(b, 297, 32, gname)
    if devnums:
        b[329:337] = _octal(0, 8)
        b[337:345] = _octal(0, 8)
    _put(b, 345, 155, prefix)
    b[148:156] = b"        "
    chk = sum(b)
    b[148:155] = b"%06o\0" % chk
    b[155:156] = b" "
    return bytes(b)


def tar_header(name: str, size: int = 0, mode: int = 0o644, mtime: int = 0,
               typeflag: bytes = b"0", linkname: str = "", uid: int = 0, gid: int = 0,
               uname: str = "", gname: str = "") -> bytes:
    """Header block(s) for one member, as Go archive/tar writes a Header with
    Format=FormatPAX and whole-second times: a plain ustar header when every field fits
    (long ASCII names are split into prefix/name), otherwise a ``PaxHeaders.0`` extended
    header (path, linkpath, size, uname, gname records, sorted) followed by the ustar
    header with the over-long fields truncated or zeroed."""
    bname = name.encode("utf-8")
    blink = linkname.encode("utf-8")
    pax: dict[str, str] = {}
    ustar_ok = True
    prefix_split = None
    if len(bname) > 100 or not bname.isascii():
        pax["path"] = name
        prefix_split = _split_ustar_path(bname)
        if prefix_split is None:
            ustar_ok = False
    if len(blink) > 100 or not blink.isascii():
        pax["linkpath"] = linkname
        ustar_ok = False
    if size >= 8 ** 11:
        pax["size"] = str(size)
        ustar_ok = False
    for key, val in (("uname", uname), ("gname", gname)):
        bv = val.encode("utf-8")
        if len(bv) > 32 or not bv.isascii():
            pax[key] = val
            ustar_ok = False
    if ustar_ok:
        prefix, short = prefix_split if prefix_split else (b"", bname)
        return _block(short, mode, uid, gid, size, mtime, typeflag, blink,
                      uname.encode(), gname.encode(), prefix)
    data = b"".join(_pax_record(k, pax[k]) for k in sorted(pax))
    d, _, f = name.rpartition("/")
    xname = (d + "/" if d else "") + "PaxHeaders.0" + ("/" + f if f else "")
    xb = xname.encode("ascii", "replace")[:100].rstrip(b"/")
    out = [_block(xb, 0, 0, 0, len(data), 0, b"x", b"", b"", b"", devnums=False), data,
           bytes(-len(data) % BLOCK)]
    out.append(_block(bname[:100], mode, uid, gid, size, mtime, typeflag, blink[:100],
                      uname.encode()[:32], gname.encode()[:32]))
    return b"".join(out)


def _pad(n: int) -> int:
    return -n % BLOCK


def _header_len(name: str, size: int = 0, linkname: str = "") -> int:
    return len(tar_header(name, size, linkname=linkname))


# --------------------------------------------------------------------------------------
# Deterministic content generators (fast: slices of a pool + byte permutation)
# --------------------------------------------------------------------------------------

_POOLS: dict = {}
_WORDS = (
    "the of and to in is for on that with as are this be by from at or an it not info "
    "debug warn error request response server client config value default module import "
    "return function class struct static const void int char string buffer length size "
    "offset index layer image archive manifest digest sha256 tar gzip zstd stream pipe "
    "read write open close file path directory user group mode time created updated "
    "version release build install package library binary shared object symbol table "
    "http https GET POST PUT DELETE 200 404 500 true false null none ok fail retry timeout"
).split()


def _random_pool(seed: int) -> bytes:
    key = ("r", seed)
    if key not in _POOLS:
        pool = random.Random(seed * 7919 + 17).randbytes(8 * CHUNK)
        _POOLS[key] = pool + pool[:CHUNK]
    return _POOLS[key]


def _text_pool(seed: int) -> bytes:
    key = ("t", seed)
    if key not in _POOLS:
        rng = random.Random(seed * 104729 + 3)
        vocab = [w.encode() for w in _WORDS]
        vocab += [("%s_%d" % (rng.choice(_WORDS), rng.randrange(1000))).encode() for _ in range(600)]
        weights = [1.0 / (i + 1) ** 0.9 for i in range(len(vocab))]
        rng.shuffle(vocab)
        lines = []
        total = 0
        target = 6 * CHUNK
        while total < target:
            words = rng.choices(vocab, weights, k=4096)
            # break into lines of 6..14 words, like log / source text
            i = 0
            while i < len(words):
                n = 6 + (i * 7 + total) % 9
                line = b"%04d-%02d %s\n" % (rng.randrange(10000), rng.randrange(60), b" ".join(words[i:i + n]))
                lines.append(line)
                total += len(line)
                i += n
        pool = b"".join(lines)[:target]
        _POOLS[key] = pool + pool[:CHUNK]
    return _POOLS[key]


_LOWER = bytes(range(ord("a"), ord("z") + 1))


def _chunk(seed: int, kind: str, file_no: int, chunk_no: int, n: int) -> bytes:
    """Chunk ``chunk_no`` of file ``file_no``: pseudo-random ('random', incompressible)
    or text-like ('text', compressible). Each chunk is a slice of a per-seed pool passed
    through a per-chunk byte permutation, so no two chunks share literal matches."""
    rng = random.Random((seed << 48) ^ (file_no << 24) ^ chunk_no ^ (0x5EED if kind == "text" else 0))
    if kind == "random":
        pool = _random_pool(0)
        table: list[int] | bytearray = list(range(256))
        rng.shuffle(table)
    else:
        pool = _text_pool(0)
        letters = list(_LOWER)
        rng.shuffle(letters)
        t = bytearray(range(256))
        t[_LOWER[0]:_LOWER[-1] + 1] = bytes(letters)
        table = t
    off = rng.randrange(len(pool) - CHUNK)
    return pool[off:off + n].translate(bytes(table))


def _small_blob(rng: random.Random, n: int, kind: str = "random") -> bytes:
    if kind == "random":
        return rng.randbytes(n)
    seed = rng.randrange(1 << 30)
    pool = _text_pool(0)
    off = seed % (len(pool) - CHUNK)
    out = bytearray()
    while len(out) < n:
        k = min(n - len(out), CHUNK)
        out += pool[off:off + k]
        off = (off + 4099) % (len(pool) - CHUNK)
    return bytes(out)


# --------------------------------------------------------------------------------------
# Layers and images
# --------------------------------------------------------------------------------------

@dataclass(eq=False)
class LazyContent:
    """A generator spec for big layers: ``size`` content bytes spread over files of
    ``file_size`` bytes under ``root``; a ``random_fraction`` of the files (evenly
    interleaved) is incompressible, the rest text-like. Data is produced on demand in
    1 MiB chunks and is a pure function of (seed, file, chunk)."""
    size: int
    random_fraction: float = 0.5
    seed: int = 0
    file_size: int = 64 * CHUNK
    root: str = "data"

    def files(self) -> list[tuple[str, int, str]]:
        out = []
        nfiles = max(1, -(-self.size // self.file_size))
        for j in range(nfiles):
            sz = min(self.file_size, self.size - j * self.file_size) if self.size else 0
            is_random = int((j + 1) * self.random_fraction) > int(j * self.random_fraction)
            kind = "random" if is_random else "text"
            ext = "bin" if is_random else "txt"
            out.append((f"{self.root}/part-{j:05d}.{ext}", sz, kind))
        return out

    def iter_file(self, file_no: int, size: int, kind: str) -> Iterator[bytes]:
        k = 0
        left = size
        while left > 0:
            n = min(CHUNK, left)
            yield _chunk(self.seed, kind, file_no, k, n)
            left -= n
            k += 1


@dataclass(eq=False)
class Layer:
    """One image layer. Its tar (the diffID source) contains, in path order: parent
    directories (0755), ``files`` (path, bytes) (0644, or 0755 for ``*.sh``), ``symlinks``
    (path, target), ``hardlinks`` (path, existing member path), whiteouts (``.wh.<name>``
    for each path in ``whiteouts``; a path ending in ``/`` gives an opaque
    ``.wh..wh..opq``), then lazily generated ``lazy`` content. A layer with nothing in
    it is the 1024-byte empty tar (diffID sha256:5f70bf18...)."""
    files: list = field(default_factory=list)
    whiteouts: list = field(default_factory=list)
    symlinks: list = field(default_factory=list)
    hardlinks: list = field(default_factory=list)
    dirs: list = field(default_factory=list)
    lazy: LazyContent | None = None
    mtime: int = 1704067200
    prefix: str = ""
    created_by: str = ""
    comment: str | None = None
    created: str | None = None
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    # -- tar content --------------------------------------------------------------
    def _entries(self):
        """[(path, typeflag, mode, size, linkname, source)] in tar order."""
        ents: dict[str, tuple] = {}
        dirs: set[str] = set()

        def add_parents(p: str):
            parts = p.strip("/").split("/")[:-1]
            for i in range(1, len(parts) + 1):
                dirs.add("/".join(parts[:i]))

        for p, data in self.files:
            add_parents(p)
            mode = 0o755 if p.endswith(".sh") else 0o644
            ents[p] = (b"0", mode, len(data), "", data)
        for p, target in self.symlinks:
            add_parents(p)
            ents[p] = (b"2", 0o777, 0, target, None)
        links = []
        for p, target in self.hardlinks:  # after everything else: a link needs its target first
            add_parents(p)
            links.append((self.prefix + p, b"1", 0o644, 0, self.prefix + target, None))
        for p in self.whiteouts:
            if p.endswith("/"):
                wp = p + ".wh..wh..opq"
            else:
                d, _, base = p.rpartition("/")
                wp = (d + "/" if d else "") + ".wh." + base
            add_parents(wp)
            ents[wp] = (b"0", 0o644, 0, "", b"")
        for d in self.dirs:
            d = d.strip("/")
            add_parents(d + "/x")
        lazy_files = []
        if self.lazy is not None:
            add_parents(self.lazy.root + "/x")
            for j, (p, sz, kind) in enumerate(self.lazy.files()):
                lazy_files.append((p, sz, kind, j))
        for d in dirs:
            ents.setdefault(d, (b"5", 0o755, 0, "", None))
        out: list[tuple[str, bytes, int, int, str, object]] = []
        if self.prefix == "./" and ents:
            out.append(("./", b"5", 0o755, 0, "", None))
        for p in sorted(ents):
            t, mode, size, link, src = ents[p]
            name = self.prefix + p + ("/" if t == b"5" else "")
            out.append((name, t, mode, size, link, src))
        out += links
        for p, sz, kind, j in lazy_files:
            out.append((self.prefix + p, b"0", 0o644, sz, "", (j, kind)))
        return out

    def tar_size(self) -> int:
        if "size" not in self._cache:
            n = 0
            for name, _type, _mode, size, link, _src in self._entries():
                n += _header_len(name, size, link) + size + _pad(size)
            self._cache["size"] = n + 2 * BLOCK
        return self._cache["size"]

    def iter_tar(self) -> Iterator[bytes]:
        """The layer tar, in chunks of at most 1 MiB (small layers: one chunk)."""
        if "bytes" in self._cache:
            yield self._cache["bytes"]
            return
        buf = bytearray()
        for name, t, mode, size, link, src in self._entries():
            buf += tar_header(name, size, mode, self.mtime, t, link)
            if isinstance(src, (bytes, bytearray)):
                buf += src
                buf += bytes(_pad(size))
            elif isinstance(src, tuple) and self.lazy is not None:
                j, kind = src
                for piece in self.lazy.iter_file(j, size, kind):
                    if buf:
                        yield bytes(buf)
                        buf = bytearray()
                    yield piece
                buf += bytes(_pad(size))
            if len(buf) >= CHUNK:
                yield bytes(buf)
                buf = bytearray()
        buf += bytes(2 * BLOCK)
        yield bytes(buf)

    def tar_bytes(self) -> bytes:
        """Whole layer tar in memory (only for small, non-lazy layers)."""
        if self.lazy is not None:
            raise ValueError("lazy layer: use iter_tar()")
        if "bytes" not in self._cache:
            self._cache["bytes"] = b"".join(self.iter_tar())
        return self._cache["bytes"]

    @property
    def diff_id(self) -> str:
        if "diff_id" not in self._cache:
            h = hashlib.sha256()
            n = 0
            if self.lazy is None:
                data = self.tar_bytes()
                h.update(data)
                n = len(data)
            else:
                for piece in self.iter_tar():
                    h.update(piece)
                    n += len(piece)
            assert n == self.tar_size(), (n, self.tar_size())
            self._cache["diff_id"] = "sha256:" + h.hexdigest()
        return self._cache["diff_id"]

    # -- gzip blob ----------------------------------------------------------------
    def _gzip_pieces(self) -> Iterator[bytes]:
        if self.tar_size() == 2 * BLOCK and self.lazy is None and not self._entries():
            yield _empty_layer_gzip()
            return
        co = zlib.compressobj(6, zlib.DEFLATED, -15, 8)
        crc = 0
        n = 0
        yield b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # Go compress/gzip header
        for piece in self.iter_tar():
            crc = zlib.crc32(piece, crc)
            n += len(piece)
            out = co.compress(piece)
            if out:
                yield out
        yield co.flush() + crc.to_bytes(4, "little") + (n & 0xFFFFFFFF).to_bytes(4, "little")

    def gzip_info(self) -> tuple[str, int]:
        """(digest, size) of the gzip blob of this layer."""
        if "gz" not in self._cache:
            h = hashlib.sha256()
            n = 0
            keep: list[bytes] | None = [] if self.lazy is None else None
            for piece in self._gzip_pieces():
                h.update(piece)
                n += len(piece)
                if keep is not None:
                    keep.append(piece)
            if keep is not None:
                self._cache["gz_bytes"] = b"".join(keep)
            self._cache["gz"] = ("sha256:" + h.hexdigest(), n)
        return self._cache["gz"]

    def iter_gzip(self) -> Iterator[bytes]:
        self.gzip_info()
        if "gz_bytes" in self._cache:
            yield self._cache["gz_bytes"]
        else:
            yield from self._gzip_pieces()


def _empty_layer_gzip() -> bytes:
    return _EMPTY_LAYER_GZIP


def layer_tar_size(layer: Layer) -> int:
    return layer.tar_size()


def iter_layer_tar(layer: Layer) -> Iterator[bytes]:
    return layer.iter_tar()


@dataclass(eq=False)
class Image:
    """An image: ``name`` ("repo:tag", Docker familiar form), ``layers`` (bottom first),
    ``created`` (RFC 3339, Go RFC3339Nano style), ``config`` (the container-config
    section: Env, Cmd, WorkingDir, Labels, ...), ``history`` (None: one entry per
    layer), ``extra`` (additional top-level config fields)."""
    name: str
    layers: list
    created: str = "2024-01-01T00:00:00Z"
    config: dict = field(default_factory=dict)
    history: list | None = None
    extra: dict = field(default_factory=dict)
    architecture: str = "amd64"
    os: str = "linux"

    @property
    def repo(self) -> str:
        return self.name.rpartition(":")[0] if _has_tag(self.name) else self.name

    @property
    def tag(self) -> str:
        return self.name.rpartition(":")[2] if _has_tag(self.name) else "latest"


def _has_tag(name: str) -> bool:
    return ":" in name.rpartition("/")[2]


def _created_secs(created: str) -> int:
    import datetime as _dt
    s = created.rstrip("Z")
    base = s.split(".")[0]
    dt = _dt.datetime.strptime(base, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=_dt.timezone.utc)
    return int(dt.timestamp())


def _full_name(name: str) -> str:
    """docker.io normalisation (what podman writes and containerd annotates)."""
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return name
    if not sep:
        return "docker.io/library/" + name
    return "docker.io/" + name


def diff_ids(image: Image) -> list[str]:
    return [layer.diff_id for layer in image.layers]


def _history(image: Image) -> list[dict]:
    if image.history is not None:
        return image.history
    out = []
    for layer in image.layers:
        h = {"created": layer.created or image.created}
        if layer.created_by:
            h["created_by"] = layer.created_by
        if layer.comment:
            h["comment"] = layer.comment
        out.append(h)
    return out


def config_dict(image: Image) -> dict:
    d = {
        "architecture": image.architecture,
        "config": image.config,
        "created": image.created,
        "history": _history(image),
        "os": image.os,
        "rootfs": {"type": "layers", "diff_ids": diff_ids(image)},
    }
    d.update(image.extra)
    return {k: d[k] for k in sorted(d)}


def config_bytes(image: Image) -> bytes:
    return gojson(config_dict(image))


def config_digest(image: Image) -> str:
    return "sha256:" + hashlib.sha256(config_bytes(image)).hexdigest()


# -- Docker v1 ids (image/v1/imagev1.go CreateID) ----------------------------------------

_CC_FIELDS = [  # (name, zero, omitempty) in moby api/types/container.Config order
    ("Hostname", "", False), ("Domainname", "", False), ("User", "", False),
    ("AttachStdin", False, False), ("AttachStdout", False, False), ("AttachStderr", False, False),
    ("ExposedPorts", None, True), ("Tty", False, False), ("OpenStdin", False, False),
    ("StdinOnce", False, False), ("Env", None, False), ("Cmd", None, False),
    ("Healthcheck", None, True), ("ArgsEscaped", False, True), ("Image", "", False),
    ("Volumes", None, False), ("WorkingDir", "", False), ("Entrypoint", None, False),
    ("NetworkDisabled", False, True), ("MacAddress", "", True), ("OnBuild", None, False),
    ("Labels", None, False), ("StopSignal", "", True), ("StopTimeout", None, True),
    ("Shell", None, True),
]
_MAP_FIELDS = {"ExposedPorts", "Volumes", "Labels"}


def _go_container_config(d: dict | None) -> dict:
    d = d or {}
    out = {}
    for name, zero, omitempty in _CC_FIELDS:
        v = d.get(name, zero)
        if name in _MAP_FIELDS and v is not None:
            v = _sorted_map(v)
            if omitempty and not v:
                continue
        if omitempty and (v == zero or v in (None, "", False, [], {})):
            continue
        out[name] = v
    return out


def _v1_image(cfg: dict | None, parent_hex: str = "", created: str = "1970-01-01T00:00:00Z",
              os_name: str = "") -> dict:
    """V1Image marshalled in Go struct order (ID left out)."""
    d: dict = {}
    if cfg is None:
        if parent_hex:
            d["parent"] = parent_hex
        d["created"] = created
        d["container_config"] = _go_container_config(None)
        if os_name:
            d["os"] = os_name
        return d
    if cfg.get("parent"):
        d["parent"] = cfg["parent"]
    if cfg.get("comment"):
        d["comment"] = cfg["comment"]
    d["created"] = cfg.get("created", "0001-01-01T00:00:00Z")
    if cfg.get("container"):
        d["container"] = cfg["container"]
    d["container_config"] = _go_container_config(cfg.get("container_config"))
    if cfg.get("docker_version"):
        d["docker_version"] = cfg["docker_version"]
    if cfg.get("author"):
        d["author"] = cfg["author"]
    if cfg.get("config") is not None:
        d["config"] = _go_container_config(cfg["config"])
    for k in ("architecture", "variant", "os"):
        if cfg.get(k):
            d[k] = cfg[k]
    return d


def docker_v1_layers(image: Image) -> list[tuple[str, bytes]]:
    """[(v1id hex, json bytes)] per layer position, as dockerd's save writes them."""
    return docker_v1_from_config(config_dict(image))


def docker_v1_from_config(cfg: dict) -> list[tuple[str, bytes]]:
    """Docker's v1 ids and v1 json per layer position, from a parsed image config
    (parse it with json.loads: key order of nested objects does not matter, it is
    re-marshalled in Go struct order)."""
    ids = cfg["rootfs"]["diff_ids"]
    os_name = cfg.get("os", "")
    chains = chain_ids(ids)
    out = []
    parent = ""
    for i in range(len(ids)):
        top = i == len(ids) - 1
        v1 = _v1_image(cfg) if top else _v1_image(None)
        m = dict(v1)
        m["layer_id"] = chains[i]
        if parent:
            m["parent"] = "sha256:" + parent
        else:
            m.pop("parent", None)
        v1id = hashlib.sha256(gojson(_sorted_map(m))).hexdigest()
        # the json written: id, parent (hex), then the rest, with os set
        js = {"id": v1id}
        if parent:
            js["parent"] = parent
        for k, v in v1.items():
            if k not in ("parent",):
                js[k] = v
        if not top:
            js.pop("os", None)
            if os_name:
                js["os"] = os_name
        out.append((v1id, gojson(js)))
        parent = v1id
    return out


def podman_v1_layers(image: Image) -> list[tuple[str, bytes]]:
    """[(layer id hex, json bytes)] as containers/image's docker-archive writer makes them."""
    return podman_v1_from_config(json.loads(config_bytes(image)))


# --------------------------------------------------------------------------------------
# Archive members and writer
# --------------------------------------------------------------------------------------

@dataclass
class _Member:
    name: str
    typeflag: bytes = b"0"
    mode: int = 0o644
    mtime: int = 0
    size: int = 0
    data: bytes | Callable[[], Iterable[bytes]] | None = None
    linkname: str = ""
    uname: str = ""
    gname: str = ""


class _Owner(TypedDict):
    uname: str
    gname: str


_ROOT: _Owner = {"uname": "root", "gname": "root"}


def _write_members(out: BinaryIO, members: Iterable[_Member]) -> None:
    write = out.write
    for m in members:
        write(tar_header(m.name, m.size, m.mode, m.mtime, m.typeflag, m.linkname,
                         uname=m.uname, gname=m.gname))
        n = 0
        if isinstance(m.data, (bytes, bytearray, memoryview)):
            write(m.data)
            n = len(m.data)
        elif m.data is not None:
            for piece in m.data():
                write(piece)
                n += len(piece)
        if n != m.size:
            raise RuntimeError(f"member {m.name}: wrote {n} bytes, header says {m.size}")
        if _pad(n):
            write(bytes(_pad(n)))
    write(bytes(2 * BLOCK))


def _walk_key(name: str):
    # filepath.WalkDir order: lexical per directory component
    return name.rstrip("/").split("/")


def _save_mtime(images: list[Image]) -> int:
    """Stand-in for the wall clock at save time (deterministic)."""
    return max(_created_secs(i.created) for i in images) + 4


def _members_docker_legacy(images: list[Image]) -> list[_Member]:
    now = _save_mtime(images)
    dirs: dict[str, list[_Member]] = {}
    saved_diff: dict[str, str] = {}
    extra: list[_Member] = []
    manifest = []
    repos: dict[str, dict[str, str]] = {}
    R = _ROOT
    for im in images:
        ct = _created_secs(im.created)
        v1s = docker_v1_layers(im)
        paths = []
        for layer, (v1id, js) in zip(im.layers, v1s):
            paths.append(f"{v1id}/layer.tar")
            if v1id in dirs:
                continue
            did = layer.diff_id
            if did in saved_diff:
                mt = now
                lm = _Member(f"{v1id}/layer.tar", b"2", 0o120777, mt, 0, None,
                             f"../{saved_diff[did]}/layer.tar", **R)
            else:
                mt = ct
                saved_diff[did] = v1id
                lm = _Member(f"{v1id}/layer.tar", b"0", 0o100644, mt, layer.tar_size(),
                             layer.iter_tar, **R)
            dirs[v1id] = [
                _Member(f"{v1id}/", b"5", 0o40755, mt, **R),
                _Member(f"{v1id}/VERSION", b"0", 0o100644, mt, 3, b"1.0", **R),
                _Member(f"{v1id}/json", b"0", 0o100644, mt, len(js), js, **R),
                lm,
            ]
        cb = config_bytes(im)
        chex = hashlib.sha256(cb).hexdigest()
        if not any(m.name == f"{chex}.json" for m in extra):
            extra.append(_Member(f"{chex}.json", b"0", 0o100644, ct, len(cb), cb, **R))
        manifest.append({"Config": f"{chex}.json", "RepoTags": [im.name] if im.name else None,
                         "Layers": paths})
        if im.name:
            repos.setdefault(im.repo, {})[im.tag] = v1s[-1][0]
    members = [m for ms in dirs.values() for m in ms] + extra
    mj = gojson(manifest) + b"\n"
    members.append(_Member("manifest.json", b"0", 0o100644, 0, len(mj), mj, **R))
    if repos:
        rj = gojson(_sorted_map({k: _sorted_map(v) for k, v in repos.items()})) + b"\n"
        members.append(_Member("repositories", b"0", 0o100644, 0, len(rj), rj, **R))
    members.sort(key=lambda m: _walk_key(m.name))
    return members


def _oci_manifest(image: Image, gzip: bool, indent: int | None = None) -> bytes:
    cb = config_bytes(image)
    layers = []
    for layer in image.layers:
        if gzip:
            dg, sz = layer.gzip_info()
            layers.append({"mediaType": MT_LAYER_GZIP, "digest": dg, "size": sz})
        else:
            layers.append({"mediaType": MT_LAYER_TAR, "digest": layer.diff_id, "size": layer.tar_size()})
    m = {"schemaVersion": 2, "mediaType": MT_OCI_MANIFEST,
         "config": {"mediaType": MT_OCI_CONFIG, "digest": "sha256:" + hashlib.sha256(cb).hexdigest(),
                    "size": len(cb)},
         "layers": layers}
    return gojson(m, indent)


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _members_docker_oci(images: list[Image]) -> list[_Member]:
    now = _save_mtime(images)
    first_ct = _created_secs(images[0].created)
    blobs: dict[str, _Member] = {}
    index_entries = []
    manifest = []
    repos: dict[str, dict[str, str]] = {}

    def add(hexd, mt, size, data):
        if hexd not in blobs:
            blobs[hexd] = _Member(f"blobs/sha256/{hexd}", b"0", 0o644, mt, size, data)

    for im in images:
        ct = _created_secs(im.created)
        for layer in im.layers:
            add(layer.diff_id[7:], ct, layer.tar_size(), layer.iter_tar)
        cb = config_bytes(im)
        add(_sha(cb), ct, len(cb), cb)
        for _v1id, js in docker_v1_layers(im):
            add(_sha(js), ct, len(js), js)
        mb = _oci_manifest(im, gzip=False)
        add(_sha(mb), 0, len(mb), mb)
        ent = {"mediaType": MT_OCI_MANIFEST, "digest": "sha256:" + _sha(mb), "size": len(mb)}
        if im.name:  # untagged (25.0.3+): one entry without annotations
            ent["annotations"] = {"io.containerd.image.name": _full_name(im.name),
                                  "org.opencontainers.image.ref.name": im.tag}
        index_entries.append(ent)
        sources = {}
        for layer in im.layers:
            sources[layer.diff_id] = {"mediaType": MT_LAYER_TAR, "size": layer.tar_size(),
                                      "digest": layer.diff_id}
        manifest.append({"Config": "blobs/sha256/" + _sha(cb),
                         "RepoTags": [im.name] if im.name else None,
                         "Layers": ["blobs/sha256/" + l.diff_id[7:] for l in im.layers],
                         "LayerSources": _sorted_map(sources)})
        if im.name:
            repos.setdefault(im.repo, {})[im.tag] = im.layers[-1].diff_id[7:]
    members = [_Member("blobs/", b"5", 0o755, first_ct), _Member("blobs/sha256/", b"5", 0o755, now)]
    members += [blobs[k] for k in sorted(blobs)]
    ij = gojson({"schemaVersion": 2, "mediaType": MT_OCI_INDEX, "manifests": index_entries})
    members.append(_Member("index.json", b"0", 0o644, now, len(ij), ij))
    mj = gojson(manifest) + b"\n"
    members.append(_Member("manifest.json", b"0", 0o644, 0, len(mj), mj))
    ol = b'{"imageLayoutVersion": "1.0.0"}'
    members.append(_Member("oci-layout", b"0", 0o644, 0, len(ol), ol))
    if repos:
        rj = gojson(_sorted_map({k: _sorted_map(v) for k, v in repos.items()})) + b"\n"
        members.append(_Member("repositories", b"0", 0o644, 0, len(rj), rj))
    return members


def _cstore_blobs(image: Image) -> tuple[bytes, list[tuple[str, bytes]]]:
    """(index blob, [(hex, bytes)] of the small JSON blobs) for the containerd store."""
    cb = config_bytes(image)
    mb = _oci_manifest(image, gzip=True, indent=2)
    mdg = "sha256:" + _sha(mb)
    statement = {
        "_type": "https://in-toto.io/Statement/v0.1",
        "predicateType": "https://slsa.dev/provenance/v0.2",
        "subject": [{"name": f"pkg:docker/{image.repo}@{image.tag}?platform={image.os}%2F{image.architecture}",
                     "digest": {"sha256": mdg[7:]}}],
        "predicate": {"builder": {"id": ""}, "buildType": "https://mobyproject.org/buildkit@v1",
                      "metadata": {"buildStartedOn": image.created, "buildFinishedOn": image.created,
                                   "reproducible": False}},
    }
    st = gojson(statement)
    acfg = gojson({"architecture": "unknown", "os": "unknown", "config": {},
                   "rootfs": {"type": "layers", "diff_ids": ["sha256:" + _sha(st)]}})
    am = gojson({"schemaVersion": 2, "mediaType": MT_OCI_MANIFEST,
                 "config": {"mediaType": MT_OCI_CONFIG, "digest": "sha256:" + _sha(acfg), "size": len(acfg)},
                 "layers": [{"mediaType": "application/vnd.in-toto+json", "digest": "sha256:" + _sha(st),
                             "size": len(st),
                             "annotations": {"in-toto.io/predicate-type": "https://slsa.dev/provenance/v0.2"}}]},
                indent=2)
    ib = gojson({"schemaVersion": 2, "mediaType": MT_OCI_INDEX, "manifests": [
        {"mediaType": MT_OCI_MANIFEST, "digest": mdg, "size": len(mb),
         "platform": {"architecture": image.architecture, "os": image.os}},
        {"mediaType": MT_OCI_MANIFEST, "digest": "sha256:" + _sha(am), "size": len(am),
         "annotations": {"vnd.docker.reference.digest": mdg,
                         "vnd.docker.reference.type": "attestation-manifest"},
         "platform": {"architecture": "unknown", "os": "unknown"}},
    ]}, indent=2)
    small = [(_sha(x), x) for x in (cb, mb, st, acfg, am, ib)]
    return ib, small


def _members_docker_cstore(images: list[Image]) -> list[_Member]:
    blobs: dict[str, _Member] = {}
    index_entries = []
    manifest = []

    def add(hexd, size, data):
        if hexd not in blobs:
            blobs[hexd] = _Member(f"blobs/sha256/{hexd}", b"0", 0o444, 0, size, data)

    for im in images:
        for layer in im.layers:
            dg, sz = layer.gzip_info()
            add(dg[7:], sz, layer.iter_gzip)
        ib, small = _cstore_blobs(im)
        for hexd, b in small:
            add(hexd, len(b), b)
        ann = {"io.containerd.image.name": _full_name(im.name),
               "org.opencontainers.image.ref.name": im.tag} if im.name else None
        ent = {"mediaType": MT_OCI_INDEX, "digest": "sha256:" + _sha(ib), "size": len(ib)}
        if ann:
            ent["annotations"] = ann
        index_entries.append(ent)
        manifest.append({"Config": "blobs/sha256/" + _sha(config_bytes(im)),
                         "RepoTags": [im.name] if im.name else None,
                         "Layers": ["blobs/sha256/" + l.gzip_info()[0][7:] for l in im.layers]})
    members = [_Member("blobs/", b"5", 0o755, 0), _Member("blobs/sha256/", b"5", 0o755, 0)]
    members += [blobs[k] for k in sorted(blobs)]
    ij = gojson({"schemaVersion": 2, "mediaType": MT_OCI_INDEX, "manifests": index_entries})
    members.append(_Member("index.json", b"0", 0o644, 0, len(ij), ij))
    mj = gojson(manifest)
    members.append(_Member("manifest.json", b"0", 0o644, 0, len(mj), mj))
    ol = b'{"imageLayoutVersion":"1.0.0"}'
    members.append(_Member("oci-layout", b"0", 0o444, 0, len(ol), ol))
    members.sort(key=lambda m: m.name)
    return members


def _members_podman(images: list[Image]) -> list[_Member]:
    members: list[_Member] = []
    written: set[str] = set()
    legacy: set[str] = set()
    manifest = []
    repos: dict[str, dict[str, str]] = {}
    for im in images:
        for layer in im.layers:
            name = layer.diff_id[7:] + ".tar"
            if name not in written:
                written.add(name)
                members.append(_Member(name, b"0", 0o444, 0, layer.tar_size(), layer.iter_tar))
        cb = config_bytes(im)
        cname = _sha(cb) + ".json"
        if cname not in written:
            written.add(cname)
            members.append(_Member(cname, b"0", 0o444, 0, len(cb), cb))
        v1s = podman_v1_layers(im)
        for layer, (lid, js) in zip(im.layers, v1s):
            if lid in legacy:
                continue
            legacy.add(lid)
            members.append(_Member(f"{lid}/layer.tar", b"2", 0, 0, 0, None, f"../{layer.diff_id[7:]}.tar"))
            members.append(_Member(f"{lid}/VERSION", b"0", 0o444, 0, 3, b"1.0"))
            members.append(_Member(f"{lid}/json", b"0", 0o444, 0, len(js), js))
        full = _full_name(im.name) if im.name else ""
        manifest.append({"Config": cname, "RepoTags": [full] if full else [],
                         "Layers": [l.diff_id[7:] + ".tar" for l in im.layers]})
        if full:
            repo, _, tag = full.rpartition(":")
            repos.setdefault(repo, {})[tag] = v1s[-1][0]
    mj = gojson(manifest)
    members.append(_Member("manifest.json", b"0", 0o444, 0, len(mj), mj))
    rj = gojson(_sorted_map({k: _sorted_map(v) for k, v in repos.items()}))
    members.append(_Member("repositories", b"0", 0o444, 0, len(rj), rj))
    return members


def _members_oci_archive(images: list[Image]) -> list[_Member]:
    now = _save_mtime(images)
    R = _ROOT
    blobs: dict[str, _Member] = {}
    entries = []

    def add(hexd, size, data):
        if hexd not in blobs:
            blobs[hexd] = _Member(f"blobs/sha256/{hexd}", b"0", 0o100644, now, size, data, **R)

    for im in images:
        for layer in im.layers:
            dg, sz = layer.gzip_info()
            add(dg[7:], sz, layer.iter_gzip)
        cb = config_bytes(im)
        add(_sha(cb), len(cb), cb)
        mb = _oci_manifest(im, gzip=True)
        add(_sha(mb), len(mb), mb)
        ent = {"mediaType": MT_OCI_MANIFEST, "digest": "sha256:" + _sha(mb), "size": len(mb)}
        if im.name:
            ent["annotations"] = {"org.opencontainers.image.ref.name": _full_name(im.name)}
        entries.append(ent)
    members = [_Member("blobs/", b"5", 0o40755, now, **R), _Member("blobs/sha256/", b"5", 0o40755, now, **R)]
    members += [blobs[k] for k in sorted(blobs)]
    ij = gojson({"schemaVersion": 2, "manifests": entries})
    members.append(_Member("index.json", b"0", 0o100644, now, len(ij), ij, **R))
    ol = b'{"imageLayoutVersion": "1.0.0"}'
    members.append(_Member("oci-layout", b"0", 0o100644, now, len(ol), ol, **R))
    return members


_BUILDERS: dict[str, Callable[[list[Image]], list[_Member]]] = {
    "docker-legacy": _members_docker_legacy,
    "docker-oci": _members_docker_oci,
    "docker-cstore": _members_docker_cstore,
    "podman": _members_podman,
    "oci-archive": _members_oci_archive,
}


def archive_members(fmt: str, images: list[Image]) -> list[tuple[str, int]]:
    """[(member name, size)] of the archive write_archive(fmt, images) would write."""
    return [(m.name, m.size) for m in _BUILDERS[fmt](list(images))]


def layer_paths(fmt: str, image: Image) -> list[str]:
    """Archive path of each layer position of ``image`` in format ``fmt`` (the path a
    manifest.json ``Layers`` entry, or for oci-archive the blob, has). In docker-legacy a
    repeated diffID's path is a symlink to the first one."""
    if fmt == "docker-legacy":
        return [f"{v1id}/layer.tar" for v1id, _ in docker_v1_layers(image)]
    if fmt == "docker-oci":
        return ["blobs/sha256/" + l.diff_id[7:] for l in image.layers]
    if fmt in ("docker-cstore", "oci-archive"):
        return ["blobs/sha256/" + l.gzip_info()[0][7:] for l in image.layers]
    if fmt == "podman":
        return [l.diff_id[7:] + ".tar" for l in image.layers]
    raise ValueError(f"unknown format {fmt!r}")


def write_archive(out: BinaryIO, fmt: str, images: list[Image]) -> None:
    """Write one save of ``images`` (shared layers stored once, as the producer does)
    to the binary file object ``out``, streaming. Multi-image ``oci-archive`` (which
    podman cannot make) lists one manifest per image in index.json."""
    if fmt not in _BUILDERS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    images = list(images)
    if not images:
        raise ValueError("no images")
    _write_members(out, _BUILDERS[fmt](images))


# --------------------------------------------------------------------------------------
# docker inspect
# --------------------------------------------------------------------------------------

def image_id(image: Image, fmt: str = "docker-oci") -> str:
    """The ID the loading engine shows: the config digest, or for the containerd image
    store (``docker-cstore``) the digest of the image index blob."""
    if fmt == "docker-cstore":
        ib, _ = _cstore_blobs(image)
        return "sha256:" + _sha(ib)
    return config_digest(image)


def inspect_json(image: Image, fmt: str = "docker-oci") -> str:
    """What ``docker inspect IMAGE`` prints (Docker 26 graph-driver shape; with
    ``fmt="docker-cstore"`` the Id is the index digest, like the containerd store)."""
    cfg = config_dict(image)
    hist = _history(image)
    size = sum(l.tar_size() for l in image.layers)
    d = {
        "Id": image_id(image, fmt),
        "RepoTags": [image.name] if image.name else [],
        "RepoDigests": [],
        "Parent": "",
        "Comment": (hist[-1].get("comment", "") if hist else ""),
        "Created": image.created,
        "DockerVersion": cfg.get("docker_version", ""),
        "Author": cfg.get("author", ""),
        "Config": _go_container_config(image.config),
        "Architecture": image.architecture,
        "Os": image.os,
        "Size": size,
        "GraphDriver": {"Data": None, "Name": "overlay2"},
        "RootFS": {"Type": "layers", "Layers": diff_ids(image)},
        "Metadata": {"LastTagTime": "0001-01-01T00:00:00Z"},
    }
    return json.dumps([d], indent=4) + "\n"


# --------------------------------------------------------------------------------------
# The sample set
# --------------------------------------------------------------------------------------

def _script(text: str) -> bytes:
    return ("#!/bin/sh\n" + text + "\n").encode()


def sample_images(seed: int = 0, layer_kib: int = 64) -> dict[str, Image]:
    """base (2 layers), lib (base + 2), app1 (lib + app layer + two empty 1024-byte
    layers: a diffID repeated inside one image), app2 (lib + 2, the second whiting out a
    base file and making a directory opaque), app1-2 (release 2 of app1: same
    base/lib, different app content)."""
    rng = random.Random(seed)
    kib = 1024 * max(1, layer_kib)
    long_dir = "usr/share/isep/" + "/".join(["very-long-directory-name-%02d" % i for i in range(4)])
    long_name = "usr/lib/isep/plugins/" + "x" * 110 + ".so"  # > 100 bytes, not splittable -> PAX path

    base0 = Layer(
        prefix="./",
        files=[("bin/base.bin", _small_blob(rng, kib)),
               ("bin/base.sh", _script("echo base")),
               ("etc/base-remove-me.txt", b"this file is deleted by a whiteout in app2\n"),
               ("etc/isep-release", b"ISEP_RELEASE=1 seed=%d\n" % seed),
               ("usr/share/doc/isep/README", _small_blob(rng, kib // 4, "text")),
               ("usr/share/doc/isep/NOTES", b"notes\n")],
        symlinks=[("etc/os-release", "isep-release"), ("bin/sh", "base.sh")],
        hardlinks=[("bin/base-hardlink.sh", "bin/base.sh")],
        dirs=["tmp"],
        created_by="/bin/sh -c #(nop) ADD file:isep-base-rootfs in / ",
        comment="isep base rootfs", created="2024-01-01T00:00:00Z")
    base1 = Layer(
        files=[(long_dir + "/data.txt", _small_blob(rng, kib // 2, "text")),
               ("usr/share/isep/zoneinfo.bin", _small_blob(rng, kib // 4))],
        mtime=1704067300,
        created_by="COPY share/ /usr/share/isep/ # buildkit", comment="buildkit.dockerfile.v0",
        created="2024-01-01T00:01:40Z")
    lib0 = Layer(
        files=[("usr/lib/isep/VERSION", b"1.0.0\n"),
               ("usr/lib/isep/libisep.so.1", _small_blob(rng, kib * 2)),
               (long_name, _small_blob(rng, kib // 8))],
        symlinks=[("usr/lib/isep/libisep.so", "libisep.so.1")],
        mtime=1710000000, created_by="COPY files/ /usr/lib/isep/ # buildkit",
        comment="buildkit.dockerfile.v0", created="2024-03-09T16:00:00Z")
    lib1 = Layer(files=[("etc/isep/lib.conf", b"lib_option = 1\n")], mtime=1710000001,
                 created_by="COPY lib.conf /etc/isep/lib.conf # buildkit",
                 comment="buildkit.dockerfile.v0", created="2024-03-09T16:00:01Z")

    def app_layer(app: str, release: int, mtime: int, created: str) -> Layer:
        r = random.Random(seed * 1000 + release * 10 + (1 if app == "app1" else 2))
        return Layer(files=[(f"opt/{app}/data.bin", _small_blob(r, kib)),
                            (f"opt/{app}/run.sh", _script(f"echo {app} release {release}")),
                            (f"opt/{app}/share/messages.txt", _small_blob(r, kib // 2, "text"))],
                     symlinks=[(f"opt/{app}/current", f"/opt/{app}")],
                     mtime=mtime, created_by=f"COPY {app}/ /opt/{app}/ # buildkit",
                     comment="buildkit.dockerfile.v0", created=created)

    def empty(created: str) -> Layer:
        return Layer(mtime=0, created_by="WORKDIR /opt/app1", comment="buildkit.dockerfile.v0",
                     created=created)

    base_hist = [
        {"created": "2024-01-01T00:00:00Z", "created_by": base0.created_by, "comment": base0.comment},
        {"created": "2024-01-01T00:01:40Z", "created_by": base1.created_by, "comment": base1.comment},
        {"created": "2024-01-01T00:01:41Z", "created_by": 'CMD ["/bin/base.sh"]',
         "comment": "buildkit.dockerfile.v0", "empty_layer": True},
    ]
    lib_hist = base_hist + [
        {"created": "2024-03-09T16:00:00Z", "created_by": "LABEL org.isep.layer=lib",
         "comment": "buildkit.dockerfile.v0", "empty_layer": True},
        {"created": "2024-03-09T16:00:00Z", "created_by": "ENV ISEP_LIB_VERSION=1",
         "comment": "buildkit.dockerfile.v0", "empty_layer": True},
        {"created": "2024-03-09T16:00:00Z", "created_by": lib0.created_by, "comment": lib0.comment},
        {"created": "2024-03-09T16:00:01Z", "created_by": lib1.created_by, "comment": lib1.comment},
    ]

    def app_hist(app: str, app_layer_: Layer, created: str, n_empty: int) -> list:
        h = lib_hist + [
            {"created": created, "created_by": f"LABEL org.isep.layer={app}",
             "comment": "buildkit.dockerfile.v0", "empty_layer": True},
            {"created": created, "created_by": app_layer_.created_by, "comment": "buildkit.dockerfile.v0"},
        ]
        return h

    base_cfg = {"Env": ["PATH=/bin:/usr/bin"], "Cmd": ["/bin/base.sh"], "Labels": {"org.isep.layer": "base"}}
    lib_cfg = {"Env": ["PATH=/bin:/usr/bin", "ISEP_LIB_VERSION=1"], "Cmd": ["/bin/base.sh"],
               "Labels": {"org.isep.layer": "lib"}}

    base = Image("isep-sample/base:1", [base0, base1], "2024-01-01T00:01:41Z", dict(base_cfg), base_hist)
    lib = Image("isep-sample/lib:1", [base0, base1, lib0, lib1], "2024-03-09T16:00:01Z",
                dict(lib_cfg), lib_hist)

    def app1_image(release: int, created: str, mtime: int) -> Image:
        al = app_layer("app1", release, mtime, created)
        e1, e2 = empty(created), empty(created)
        h = app_hist("app1", al, created, 2) + [
            {"created": created, "created_by": "WORKDIR /opt/app1", "comment": "buildkit.dockerfile.v0"},
            {"created": created, "created_by": "WORKDIR /opt/app1", "comment": "buildkit.dockerfile.v0"},
            {"created": created, "created_by": 'CMD ["/opt/app1/run.sh"]',
             "comment": "buildkit.dockerfile.v0", "empty_layer": True},
        ]
        cfg = {"Env": lib_cfg["Env"], "Cmd": ["/opt/app1/run.sh"], "WorkingDir": "/opt/app1",
               "Labels": {"org.isep.layer": "app1", "org.isep.release": str(release)}, "ArgsEscaped": True}
        return Image(f"isep-sample/app1:{release}", [base0, base1, lib0, lib1, al, e1, e2], created, cfg, h)

    app1 = app1_image(1, "2024-05-01T12:00:00.123456789Z", 1714564800)
    app1_2 = app1_image(2, "2024-06-01T12:00:00.5Z", 1717243200)

    created2 = "2024-05-02T08:30:00Z"
    al2 = app_layer("app2", 1, 1714638600, created2)
    wl = Layer(whiteouts=["etc/base-remove-me.txt", "usr/share/doc/isep/"],
               files=[("usr/share/doc/isep/README.app2", b"app2 replaces the docs\n")],
               mtime=1714638601, created_by="RUN rm -rf /etc/base-remove-me.txt /usr/share/doc/isep/* "
                                            "&& echo app2 > /usr/share/doc/isep/README.app2 # buildkit",
               comment="buildkit.dockerfile.v0", created=created2)
    h2 = app_hist("app2", al2, created2, 0) + [
        {"created": created2, "created_by": wl.created_by, "comment": "buildkit.dockerfile.v0"},
        {"created": created2, "created_by": 'CMD ["/opt/app2/run.sh"]',
         "comment": "buildkit.dockerfile.v0", "empty_layer": True},
    ]
    cfg2 = {"Env": lib_cfg["Env"], "Cmd": ["/opt/app2/run.sh"], "Labels": {"org.isep.layer": "app2"},
            "ArgsEscaped": True}
    app2 = Image("isep-sample/app2:1", [base0, base1, lib0, lib1, al2, wl], created2, cfg2, h2)
    return {"base": base, "lib": lib, "app1": app1, "app2": app2, "app1-2": app1_2}


def write_sample_set(outdir: Path, fmt: str, seed: int = 0, layer_kib: int = 64) -> dict[str, Path]:
    """Write base.tar, lib.tar, app1.tar, app2.tar, app1-2.tar, app1+app2.tar and
    inspect-{base,lib,app1,app2,app1-2}.json into ``outdir``; returns {stem: path}."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    imgs = sample_images(seed, layer_kib)
    out: dict[str, Path] = {}
    for key in ("base", "lib", "app1", "app2", "app1-2"):
        p = outdir / f"{key}.tar"
        with open(p, "wb") as f:
            write_archive(f, fmt, [imgs[key]])
        out[key] = p
    p = outdir / "app1+app2.tar"
    with open(p, "wb") as f:
        write_archive(f, fmt, [imgs["app1"], imgs["app2"]])
    out["app1+app2"] = p
    for key in ("base", "lib", "app1", "app2", "app1-2"):
        p = outdir / f"inspect-{key}.json"
        p.write_text(inspect_json(imgs[key], fmt))
        out[f"inspect-{key}"] = p
    return out


# --------------------------------------------------------------------------------------
# Big / synthetic images for benchmarks
# --------------------------------------------------------------------------------------

def _lazy_layer_for(content_bytes: int, random_fraction: float, seed: int, idx: int, mtime: int) -> Layer:
    file_size = max(CHUNK, min(64 * CHUNK, content_bytes // 8 or CHUNK))
    file_size -= file_size % CHUNK or 0
    lz = LazyContent(size=content_bytes, random_fraction=random_fraction, seed=seed * 1009 + idx,
                     file_size=max(CHUNK, file_size), root=f"srv/layer{idx}")
    return Layer(lazy=lz, mtime=mtime, created_by=f"COPY layer{idx}/ /srv/layer{idx}/ # buildkit",
                 comment="buildkit.dockerfile.v0")


def big_image_family(total_bytes: int, random_fraction: float = 0.5, layers: int = 4,
                     seed: int = 0) -> dict[str, Image]:
    """{"base", "lib", "app"} sharing lazily generated layers; "app" has ``layers``
    layers and ~``total_bytes`` of layer data. base = the bottom quarter of the layers
    (at least 1), lib = base + the next quarter (at least 1 more, when layers >= 3)."""
    if layers < 1:
        raise ValueError("layers must be >= 1")
    per = max(0, total_bytes // layers)
    t0 = 1704067200
    lys = [_lazy_layer_for(per, random_fraction, seed, i, t0 + 60 * i) for i in range(layers)]
    for i, l in enumerate(lys):
        l.created = "2024-01-01T00:%02d:00Z" % min(59, i)
    nb = max(1, layers // 4) if layers >= 2 else 1
    nl = min(layers, nb + max(1, layers // 4)) if layers >= 3 else nb
    cfg = {"Env": ["PATH=/bin:/usr/bin"], "Cmd": ["/srv/run"]}

    def mk(name: str, n: int) -> Image:
        return Image(name, lys[:n], "2024-01-01T00:%02d:00Z" % min(59, n - 1), dict(cfg))
    return {"base": mk("isep-bench/base:1", nb), "lib": mk("isep-bench/lib:1", nl),
            "app": mk("isep-bench/big:1", layers)}


def big_image(total_bytes: int, random_fraction: float = 0.5, layers: int = 4, seed: int = 0) -> Image:
    """An image with ~``total_bytes`` of lazily generated layer data (memory stays flat:
    data is generated in 1 MiB chunks while writing; the diffIDs are computed by a first
    pass over the same deterministic generator, without storing data)."""
    return big_image_family(total_bytes, random_fraction, layers, seed)["app"]


def write_huge_member_archive(out: BinaryIO, size: int, name: str = "huge.bin",
                              pattern: bytes | None = None) -> None:
    """A valid tar stream with one regular member of ``size`` bytes (zeros, or
    ``pattern`` repeated), written in 1 MiB chunks; sizes >= 8 GiB get a PAX ``size``
    record as Go writes it."""
    out.write(tar_header(name, size, 0o644, 0))
    if pattern:
        reps = -(-CHUNK // len(pattern))
        chunk = memoryview((pattern * reps)[:CHUNK])
    else:
        chunk = memoryview(_ZERO_CHUNK)
    left = size
    while left >= CHUNK:
        out.write(chunk)
        left -= CHUNK
    if left:
        out.write(chunk[:left])
    out.write(bytes(_pad(size) + 2 * BLOCK))


def write_crowded_archive(out: BinaryIO, archive: BinaryIO, count: int, prefix: str = "extra/") -> None:
    """``count`` empty regular members (``prefix`` + a number) followed by every member of the
    image archive ``archive`` verbatim: a valid save with as many members as a test of member
    counts needs, at 512 bytes each."""
    block = 1 << 16
    for n in range(0, count, block):
        out.write(b"".join(tar_header(f"{prefix}{i:07d}") for i in range(n, min(count, n + block))))
    while True:
        piece = archive.read(CHUNK)
        if not piece:
            break
        out.write(piece)
