"""Layer deltas: a layer tar compressed against a reference layer held in memory (a zstd prefix).

A delta of a target layer against a reference layer is one zstd frame per segment, each compressed
with the matching slice of the reference as a raw prefix ("patch-from"): long-distance matching and
a window spanning the slice and the segment, so that every unchanged file becomes a match into the
reference. Frames carry content sizes and checksums. A delta of one segment is what
`zstd -d --long=31 --patch-from=REFERENCE` decodes.

Memory is the price: a segment needs its reference slice in memory (twice while the binding makes
the prefix: it copies it; decoding through libzstd, prefixdecode, uses it in place) and a window or
output buffer as large as the segment. `plan_segments` keeps
`slice + max(slice, segment)` under the memory cap (default 1 GiB) by cutting large layers into
aligned segments (segment i of the target against the proportional slice of the reference, widened
by a margin); when even a minimal segment does not fit, the layer is shipped plain (zstd, no
reference) and the record says why.

The decoder trusts nothing: the reference must have the size and diffID the record names (checked
before any output when it is held whole; at the end otherwise), every frame its checksum, every
segment its size (output is produced in bounded pieces and never beyond the size: bombs), and the
rebuilt layer the target diffID; any failure raises IntegrityError.
"""
from __future__ import annotations

import hashlib
import mmap
import queue
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Iterator

import xxhash

from . import prefixdecode
from .errors import BadInput, EnvironmentFailure, IntegrityError, Truncated
from .fields import DIGEST
from .limits import MIN_DELTA_MEMORY

if sys.version_info >= (3, 14):
    from compression import zstd
else:
    from backports import zstd

DEFAULT_MEMORY = 1 << 30      # per running delta, encoder or decoder (--delta-memory)
DEFAULT_LEVEL = 3
WINDOW_LOG_MAX = 31           # zstd's limit on 64-bit machines
PLAIN_WINDOW_LOG_MAX = 27     # plain segments: the same bound isep's other zstd readers use
SAMPLE = 8                    # the plain estimate compresses one byte in every SAMPLE
MIN_REFERENCE = 64           # zstd wants 8 bytes of prefix at least; below 64 nothing is gained
MIN_SEGMENT = MIN_DELTA_MEMORY // 2  # below this, segmenting costs more than it saves: ship plain
TABLES = 16 << 20             # zstd's hash, chain and long-distance tables at level 3, and slack
PIECE = 4 << 20               # decoded bytes produced per step
FEED = 1 << 20                # delta bytes fed per step

Chunks = Iterable  # of bytes-like objects


# --- records -------------------------------------------------------------------------------------

@dataclass
class Segment:
    """One frame of a delta: target bytes [target_offset, +target_size) compressed against the
    reference bytes [ref_offset, +ref_size) ("prefix"), or alone ("plain", ref_size 0)."""

    target_offset: int
    target_size: int
    ref_offset: int
    ref_size: int
    method: str = "prefix"
    window_log: int = 0
    size: int = 0             # compressed bytes of this frame

    def memory(self) -> int:
        """Peak bytes this segment holds while encoding or decoding."""
        return segment_memory(self.ref_size, self.target_size) if self.method == "prefix" else 0


@dataclass
class DeltaRecord:
    """What a manifest needs to know about one delta (the wiring adds the reference's part file,
    its sha256 and member name)."""

    target_diff_id: str
    target_size: int
    reference_diff_id: str
    reference_size: int
    segments: list[Segment] = field(default_factory=list)
    level: int = DEFAULT_LEVEL
    size: int = 0             # the delta's bytes: the sum of the segments' sizes
    sha256: str = ""          # of the delta's bytes
    note: str = ""            # why segmented or plain, for the plan and the report
    plain_estimate: int = 0   # the layer's plain zstd size, estimated from a sample while encoding

    @property
    def method(self) -> str:
        methods = {s.method for s in self.segments}
        if methods == {"plain"}:
            return "plain"
        return "prefix" if len(self.segments) == 1 else "segmented"

    def memory(self) -> int:
        return peak_memory(self.segments)

    def to_json(self) -> dict:
        doc = asdict(self)
        doc["method"] = self.method
        return doc

    @classmethod
    def from_json(cls, doc: object, what: str = "delta record") -> DeltaRecord:
        """A record from a manifest, every field checked (the manifest may be hostile)."""
        if not isinstance(doc, dict):
            raise BadInput(f"{what}: not an object")
        ints = ("target_size", "reference_size", "level", "size")
        if not all(type(doc.get(k)) is int and doc[k] >= 0 for k in ints):
            raise BadInput(f"{what}: {', '.join(ints)} must be non-negative integers")
        for key in ("target_diff_id", "reference_diff_id"):
            if not isinstance(doc.get(key), str) or not DIGEST.fullmatch(doc[key]):
                raise BadInput(f"{what}: {key} is not a sha256 digest")
        raw_segments = doc.get("segments")
        if not isinstance(raw_segments, list) or not raw_segments:
            raise BadInput(f"{what}: no segments")
        record = cls(doc["target_diff_id"], doc["target_size"], doc["reference_diff_id"],
                     doc["reference_size"], [_segment_from_json(s, what) for s in raw_segments],
                     doc["level"], doc["size"], str(doc.get("sha256") or ""), str(doc.get("note") or ""),
                     doc["plain_estimate"] if type(doc.get("plain_estimate")) is int else 0)
        check_segments(record, what)
        return record


def _segment_from_json(doc: object, what: str) -> Segment:
    keys = ("target_offset", "target_size", "ref_offset", "ref_size", "window_log", "size")
    if not isinstance(doc, dict) or not all(type(doc.get(k)) is int and doc[k] >= 0 for k in keys):
        raise BadInput(f"{what}: a segment lacks {', '.join(keys)}")
    if doc.get("method") not in ("prefix", "plain"):
        raise BadInput(f"{what}: a segment's method is neither prefix nor plain")
    return Segment(doc["target_offset"], doc["target_size"], doc["ref_offset"], doc["ref_size"],
                   method=doc["method"], window_log=doc["window_log"], size=doc["size"])


def check_segments(record: DeltaRecord, what: str) -> None:
    """Segments tile the target in order, stay inside the reference, and sizes add up."""
    offset = 0
    for seg in record.segments:
        if seg.target_offset != offset or seg.ref_offset + seg.ref_size > record.reference_size:
            raise BadInput(f"{what}: segments do not tile the layer or leave the reference")
        # the window (a decoder's buffer when a frame lies about its size) stays within twice
        # the slice plus the segment: the memory check below covers it
        if seg.method == "prefix" and not (seg.ref_size and 10 <= seg.window_log
                                           <= window_log_for(seg.ref_size, seg.target_size)):
            raise BadInput(f"{what}: a prefix segment has no reference bytes or a window beyond its sizes")
        offset += seg.target_size
    if offset != record.target_size or sum(s.size for s in record.segments) != record.size:
        raise BadInput(f"{what}: segment sizes do not add up to the layer and the delta")


def segment_memory(ref_size: int, target_size: int) -> int:
    """Peak bytes of one segment, as measured (libzstd 1.5.7): the slice twice while its prefix is
    made (the binding copies it), then the prefix plus the compressor's buffers, about 1.25 times
    the segment (the decoder's: 1 time), plus tables."""
    return ref_size + max(ref_size, target_size + target_size // 4) + TABLES


def window_log_for(ref_size: int, target_size: int) -> int:
    """A window reaching from the segment's end back to the slice's start."""
    return max(10, min(WINDOW_LOG_MAX, (ref_size + target_size - 1).bit_length()))


# --- planning ------------------------------------------------------------------------------------

def plan_segments(target_size: int, ref_size: int, memory: int = DEFAULT_MEMORY) -> tuple[list[Segment], str]:
    """Segments for a target against a reference within the memory cap, and a note saying why
    the layer is segmented or plain (empty when it is one prefix frame)."""
    if ref_size < MIN_REFERENCE or target_size == 0:
        return [Segment(0, target_size, 0, 0, "plain")], "tiny reference or empty layer: plain"
    if segment_memory(ref_size, target_size) <= memory:
        return [Segment(0, target_size, 0, ref_size, window_log=window_log_for(ref_size, target_size))], ""
    count = 2
    while True:
        segments = _aligned_segments(target_size, ref_size, count)
        if segments[0].target_size < MIN_SEGMENT:
            note = (f"plain: {_mib(segment_memory(ref_size, target_size))} needed for a delta, "
                    f"no segmentation fits the {_mib(memory)} cap")
            return [Segment(0, target_size, 0, 0, "plain")], note
        if peak_memory(segments) <= memory:
            break
        count += 1
    seg_size, slice_size = segments[0].target_size, segments[0].ref_size
    note = (f"segmented: {len(segments)} segments of {_mib(seg_size)} against slices of {_mib(slice_size)} "
            f"({_mib(segment_memory(ref_size, target_size))} needed whole, cap {_mib(memory)})")
    return segments, note


def _aligned_segments(target_size: int, ref_size: int, count: int) -> list[Segment]:
    """Segment i of the target against the reference's proportional slice i, widened by a margin
    on both sides (room for content that moved); slices' starts and ends never decrease."""
    seg_size = -(-target_size // count)
    margin = -(-ref_size // count) // 8
    slice_size = min(ref_size, -(-ref_size // count) + 2 * margin)
    segments = []
    for start in range(0, target_size, seg_size):
        size = min(seg_size, target_size - start)
        ref_start = max(0, min(ref_size - slice_size, start * ref_size // target_size - margin))
        segments.append(Segment(start, size, ref_start, slice_size, window_log=window_log_for(slice_size, size)))
    return segments


def peak_memory(segments: list[Segment]) -> int:
    """Peak bytes while encoding or decoding: the largest segment, plus the start of the next
    slice kept from its own."""
    kept = [max(0, a.ref_offset + a.ref_size - b.ref_offset) if b.method == "prefix" else 0
            for a, b in zip(segments, segments[1:])] + [0]
    return max((s.memory() + k for s, k in zip(segments, kept)), default=0)


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB"


# --- reading the reference -----------------------------------------------------------------------

@dataclass
class Reference:
    """A reference layer: its size and diffID, and a way to read its bytes from the start (a
    store's part decompressed, a file...). `describe` names it in messages."""

    size: int
    diff_id: str
    open: Callable[[], Chunks]
    describe: str = "reference layer"
    xxh3: str = ""            # xxh3-128 hex of the layer: when known (a store's manifest records it
    #                           for every member), checked instead of re-hashing it with sha256
    # fills a buffer of `size` bytes with the layer, verified, at once (a store part's frames
    # decompressed in parallel); False when it cannot (then `open` is read, which says what is wrong)
    load_into: Callable[[memoryview], bool] | None = None


class ReferenceReader:
    """Reads a reference once, front to back, handing out slices (buffers a prefix is made from)
    whose starts and ends do not decrease, and checks its size and digest once it has been read to
    the end.

    Memory: a slice, and the start of the next one where slices overlap; twice the slice for a
    moment where the zstd binding makes its prefix (it copies it)."""

    def __init__(self, reference: Reference, segments: list[Segment]):
        self.reference = reference
        self._slices = [(s.ref_offset, s.ref_size) for s in segments if s.method == "prefix"]
        self._chunks = iter(reference.open())
        self._sha = xxhash.xxh3_128() if reference.xxh3 else hashlib.sha256()
        self._kept = b""                  # the start of the next slice, from the last one
        self._kept_start = 0
        self._pending = memoryview(b"")   # bytes read but not yet in a slice
        self._pending_start = 0
        self._read = 0                    # reference bytes read (and hashed) so far
        self._verified = False

    def next_prefix(self) -> mmap.mmap:
        """The next slice's bytes, for a zstd prefix."""
        offset, size = self._slices.pop(0)
        new = mmap.mmap(-1, size)  # zeroed by the kernel as first written; never empty (check_segments)
        load = self.reference.load_into if size == self.reference.size and not self._read else None
        if load is not None and load(memoryview(new)):  # loaded whole at once, verified
            self._read, self._verified, filled = size, True, size
        else:
            filled = max(0, min(self._kept_start + len(self._kept) - offset, size))
            new[:filled] = self._kept[offset - self._kept_start:offset - self._kept_start + filled]
        self._kept = b""
        while filled < size:
            start, piece = self._next_piece()
            skip = offset + filled - start
            if skip >= len(piece):
                continue
            take = min(len(piece) - skip, size - filled)
            new[filled:filled + take] = piece[skip:skip + take]
            filled += take
            if skip + take < len(piece):  # the chunk may be a reused buffer: what is left is kept
                self._pending, self._pending_start = memoryview(bytes(piece[skip + take:])), start + skip + take
        if self._slices and self._slices[0][0] < offset + size:
            self._kept_start = self._slices[0][0]
            self._kept = bytes(new[self._kept_start - offset:])
        if offset == 0 and size == self.reference.size:  # held whole: verified before any use
            self.finish()
        return new

    def _next_piece(self) -> tuple[int, memoryview]:
        if len(self._pending):
            piece, self._pending = self._pending, memoryview(b"")
            return self._pending_start, piece
        chunk = next(self._chunks, None)
        if chunk is None:
            raise IntegrityError(f"{self.reference.describe} ends at {self._read} bytes, "
                                 f"{self.reference.size} expected")
        self._sha.update(chunk)  # a view of a reused buffer is copied at once (next_prefix)
        start = self._read
        self._read += len(chunk)
        if self._read > self.reference.size:
            raise IntegrityError(f"{self.reference.describe} is larger than {self.reference.size} bytes")
        return start, memoryview(chunk).cast("B")

    def finish(self) -> None:
        """Read what is left and check the reference's size and diffID (once)."""
        if self._verified:
            return
        self._pending = memoryview(b"")
        for chunk in self._chunks:
            self._sha.update(chunk)
            self._read += len(chunk)
            if self._read > self.reference.size:
                break
        expected = self.reference.xxh3 or self.reference.diff_id
        digest = self._sha.hexdigest() if self.reference.xxh3 else "sha256:" + self._sha.hexdigest()
        if self._read != self.reference.size or digest != expected:
            raise IntegrityError(f"{self.reference.describe} is not the layer the delta was made "
                                 f"against ({digest}, {self._read} bytes; expected "
                                 f"{expected}, {self.reference.size} bytes)")
        self._verified = True


# --- encoding ------------------------------------------------------------------------------------

class _Pieces:
    """Splits a chunk stream at segment boundaries."""

    def __init__(self, chunks: Chunks):
        self._chunks = iter(chunks)
        self._rest = memoryview(b"")

    def take(self, size: int) -> Iterator[memoryview]:
        while size:
            if not len(self._rest):
                chunk = next(self._chunks, None)
                if chunk is None:
                    raise Truncated("layer ended before its declared size")
                self._rest = memoryview(chunk).cast("B")
            piece = self._rest[:size]
            self._rest = self._rest[len(piece):]
            size -= len(piece)
            yield piece

    def at_end(self) -> bool:
        return not len(self._rest) and all(not len(chunk) for chunk in self._chunks)


def _binding_prefix(slice_bytes: mmap.mmap | None):
    """A prefix for the zstd binding, which copies it: the slice is freed at once."""
    if slice_bytes is None:
        return None
    prefix = zstd.ZstdDict(slice_bytes, is_raw=True)
    slice_bytes.close()
    return prefix


def _compressor(level: int, seg: Segment, prefix=None):
    options: dict[int, int] = {zstd.CompressionParameter.compression_level: level,
               zstd.CompressionParameter.checksum_flag: 1}
    if prefix is not None:
        options[zstd.CompressionParameter.window_log] = seg.window_log
        options[zstd.CompressionParameter.enable_long_distance_matching] = 1
    comp = zstd.ZstdCompressor(options=options, zstd_dict=None if prefix is None else prefix.as_prefix)
    comp.set_pledged_input_size(seg.target_size)
    return comp


def encode_layer(chunks: Chunks, target_size: int, reference: Reference, sink: Callable[[bytes], object], *,
                 level: int = DEFAULT_LEVEL, memory: int = DEFAULT_MEMORY, sample: int = SAMPLE) -> DeltaRecord:
    """Compress a layer of target_size bytes against reference, writing the delta to sink; the
    layer is read once, in chunks. Returns its record: the target's diffID computed on the way,
    and the plain size estimated from every `sample`-th MiB compressed alone (0: no estimate)."""
    segments, note = plan_segments(target_size, reference.size, memory)
    record = DeltaRecord("", target_size, reference.diff_id, reference.size, segments, level, note=note)
    ref = ReferenceReader(reference, segments) if any(s.method == "prefix" for s in segments) else None
    pieces, target_sha, delta_sha = _Pieces(chunks), hashlib.sha256(), hashlib.sha256()
    estimate = _PlainEstimate(level, sample)

    def observe(piece: memoryview) -> None:
        target_sha.update(piece)
        estimate.feed(piece)

    # The diffID and the plain estimate take 0.2 s of a 185 MB layer's 0.5 s: on a second thread,
    # beside the delta's compression of the same piece (each releases the GIL)
    with ThreadPoolExecutor(1, thread_name_prefix="isep-delta-observe") as beside:
        for seg in segments:
            prefix = _binding_prefix(ref.next_prefix() if ref is not None and seg.method == "prefix" else None)
            comp = _compressor(level, seg, prefix)
            for piece in pieces.take(seg.target_size):
                observed = beside.submit(observe, piece)
                out = comp.compress(piece)
                observed.result()  # before the next piece: this one's buffer may be reused
                seg.size += _emit(out, sink, delta_sha)
            seg.size += _emit(comp.flush(), sink, delta_sha)
            del comp, prefix
    if not pieces.at_end():
        raise BadInput(f"layer is larger than its declared {target_size} bytes")
    if ref is not None:
        ref.finish()
    record.target_diff_id = "sha256:" + target_sha.hexdigest()
    record.size = sum(s.size for s in segments)
    record.sha256 = "sha256:" + delta_sha.hexdigest()
    record.plain_estimate = estimate.result(target_size)
    return record


def _emit(blob: bytes, sink, sha=None) -> int:
    if blob:
        if sha is not None:
            sha.update(blob)
        sink(blob)
    return len(blob)


class _PlainEstimate:
    """Plain zstd of whole pieces making up one byte in every `sample`, scaled to the whole: enough
    to tell a delta that clearly wins from one that does not, at a fraction of a plain compression."""

    def __init__(self, level: int, sample: int):
        self._comp = zstd.ZstdCompressor(level=level) if sample else None
        self._sample = sample
        self._offset = self._taken = self._out = 0

    def feed(self, piece) -> None:
        if self._comp is not None and self._taken * self._sample <= self._offset:  # whatever the chunk size
            self._taken += len(piece)
            self._out += len(self._comp.compress(piece))
        self._offset += len(piece)

    def result(self, total: int) -> int:
        if self._comp is None:
            return 0
        self._out += len(self._comp.flush())
        return -(-self._out * total // self._taken) if self._taken else self._out


def to_plain(record: DeltaRecord, delta_chunks: Chunks, reference: Reference | None, sink, *,
             level: int = DEFAULT_LEVEL, memory: int = DEFAULT_MEMORY) -> int:
    """The layer a delta rebuilds, compressed plain into sink (when the delta does not win after
    all); returns the plain size."""
    comp = zstd.ZstdCompressor(level=level)
    size = 0
    for piece in decode_layer(record, delta_chunks, reference, memory=memory):
        size += _emit(comp.compress(piece), sink)
    return size + _emit(comp.flush(), sink)


# --- decoding ------------------------------------------------------------------------------------

def decode_layer(record: DeltaRecord, delta_chunks: Chunks, reference: Reference | None, *,
                 memory: int = DEFAULT_MEMORY, what: str = "layer",
                 hashed_by_caller: bool = False) -> Iterator[memoryview | bytes]:
    """The layer rebuilt from its delta, in pieces of at most PIECE bytes. Raises IntegrityError
    (after the last piece at the latest) when anything does not match: the caller must not
    declare the output good before this generator is exhausted. hashed_by_caller: the caller
    checks the pieces' sha256 against record.target_diff_id (a join hashes every member anyway)."""
    check_segments(record, f"{what}: delta record")
    if record.memory() > memory:
        raise EnvironmentFailure(f"{what}: its delta needs {_mib(record.memory())} of memory, "
                                 f"the cap is {_mib(memory)} (--delta-memory)")
    ref = None
    if any(s.method == "prefix" for s in record.segments):
        if reference is None:
            raise IntegrityError(f"{what}: its delta needs the reference layer {record.reference_diff_id}")
        if reference.diff_id != record.reference_diff_id or reference.size != record.reference_size:
            raise IntegrityError(f"{what}: its delta was made against {record.reference_diff_id} "
                                 f"({record.reference_size} bytes), not {reference.diff_id}")
        ref = ReferenceReader(reference, record.segments)
    feed = _Feed(delta_chunks, what)
    sha = None if hashed_by_caller else _HashingThread()
    try:
        for seg in record.segments:
            prefix = ref.next_prefix() if ref is not None and seg.method == "prefix" else None
            for piece in _decode_segment(seg, feed, prefix, what):
                if sha is not None:
                    sha.update(piece)
                yield piece
            del prefix
    finally:
        digest = "sha256:" + sha.hexdigest() if sha is not None else record.target_diff_id
    if not feed.at_end():
        raise IntegrityError(f"{what}: data after the delta's last frame")
    if ref is not None:
        ref.finish()
    if digest != record.target_diff_id:
        raise IntegrityError(f"{what}: rebuilt from its delta with diffID {digest}, "
                             f"expected {record.target_diff_id}")


class _HashingThread:
    """sha256 of the decoded pieces on a second thread (hashlib releases the GIL), a few pieces
    behind the decoder."""

    def __init__(self):
        self._sha = hashlib.sha256()
        self._queue: queue.Queue = queue.Queue(maxsize=4)
        self._thread = threading.Thread(target=self._run, name="isep-delta-hash", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            piece = self._queue.get()
            if piece is None:
                return
            self._sha.update(piece)

    def update(self, piece: bytes | memoryview) -> None:
        self._queue.put(piece)

    def hexdigest(self) -> str:
        self._queue.put(None)
        self._thread.join()
        return self._sha.hexdigest()


class _Feed:
    """Delta bytes, handed out in steps of FEED bytes, with what a finished frame left over."""

    def __init__(self, chunks: Chunks, what: str):
        self._chunks = iter(chunks)
        self._rest: memoryview = memoryview(b"")
        self.what = what

    def next(self):
        if not len(self._rest):
            chunk = next(self._chunks, None)
            if chunk is None:
                raise Truncated(f"{self.what}: delta data ends inside a frame")
            self._rest = memoryview(chunk).cast("B")
        step, self._rest = self._rest[:FEED], self._rest[FEED:]
        return step

    def push_back(self, data: bytes) -> None:
        self._rest = memoryview(bytes(data) + bytes(self._rest))

    def at_end(self) -> bool:
        if len(self._rest):
            return False
        return all(not len(chunk) for chunk in self._chunks)


def _decode_segment(seg: Segment, feed: _Feed, slice_bytes: mmap.mmap | None,
                    what: str) -> Iterator[bytes | memoryview]:
    if slice_bytes is not None and prefixdecode.available():
        return _decode_in_place(seg, feed, slice_bytes, what)
    return _decode_through_binding(seg, feed, _binding_prefix(slice_bytes), what)


def _decode_in_place(seg: Segment, feed: _Feed, slice_bytes: mmap.mmap, what: str) -> Iterator[memoryview]:
    """libzstd decoding against the slice where it lies, into one buffer of the segment's size."""
    decoder = prefixdecode.FrameDecoder(slice_bytes, seg.target_size, seg.window_log, what)
    consumed = 0
    try:
        while not decoder.ended:
            data = feed.next()
            consumed += len(data)
            yield from decoder.feed(data)
    finally:
        decoder.close()
    if decoder.unused:
        consumed -= len(decoder.unused)
        feed.push_back(decoder.unused)
    _check_segment(seg, decoder.produced, consumed, what)


def _decode_through_binding(seg: Segment, feed: _Feed, prefix, what: str) -> Iterator[bytes]:
    window_log_max = seg.window_log if prefix is not None else PLAIN_WINDOW_LOG_MAX
    decomp = zstd.ZstdDecompressor(zstd_dict=None if prefix is None else prefix.as_prefix,
                                   options={zstd.DecompressionParameter.window_log_max: window_log_max})
    produced = consumed = 0
    try:
        while not decomp.eof:
            data = feed.next() if decomp.needs_input else b""
            consumed += len(data)
            out = decomp.decompress(data, PIECE)
            produced += len(out)
            if produced > seg.target_size:
                raise IntegrityError(f"{what}: a delta frame expands beyond its {seg.target_size} bytes")
            if out:
                yield out
    except zstd.ZstdError as exc:
        raise IntegrityError(f"{what}: delta does not decode against its reference ({exc})") from None
    if decomp.unused_data:
        consumed -= len(decomp.unused_data)
        feed.push_back(decomp.unused_data)
    _check_segment(seg, produced, consumed, what)


def _check_segment(seg: Segment, produced: int, consumed: int, what: str) -> None:
    if produced != seg.target_size or consumed != seg.size:
        raise IntegrityError(f"{what}: a delta frame gave {produced} bytes from {consumed}, "
                             f"expected {seg.target_size} from {seg.size}")
