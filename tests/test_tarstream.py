"""The streaming reader: verbatim, bounded, and clear about bad input."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from isep.errors import BadInput
from isep.tarstream import Source, TarReader, _octal, padded, parse_pax
from isep.tarwrite import _pax_record, build_header


def read_back(data: bytes, prefetch: bool = True) -> tuple[bytes, list]:
    reader = TarReader(Source(io.BytesIO(data), prefetch=prefetch, name="test"))
    out, names = [], []
    for member in reader:
        names.append((member.name, member.kind, member.size, member.linkname))
        out.extend(bytes(c) for c in member.raw_chunks())
    out.append(reader.trailer)
    return b"".join(out), names


names = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=0x2FF, blacklist_characters="/\\"),
                min_size=1, max_size=40).filter(lambda n: n not in (".", ".."))  # names loaders clean
paths = st.lists(names, min_size=1, max_size=6).map("/".join)
entries = st.lists(st.tuples(paths, st.sampled_from(["file", "dir", "symlink", "hardlink"]),
                             st.binary(max_size=3000)), min_size=0, max_size=8)


def make_tar(items, fmt) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        if any(kind == "hardlink" for _, kind, _ in items):  # a hard link names an earlier member
            items = [("target", "file", b"t")] + list(items)
        for i, (name, kind, data) in enumerate(items):
            name = f"{i}/{name}"
            info = tarfile.TarInfo(name)
            info.mtime = 1700000000 + i
            if kind == "file":
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                info.type = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE}[kind]
                info.linkname = {"dir": "", "symlink": "target/" + name, "hardlink": "0/target"}[kind]
                tar.addfile(info)
    return buf.getvalue()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entries, st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT]))
def test_members_written_back_reproduce_the_archive(items, fmt):
    try:
        data = make_tar(items, fmt)
    except ValueError:  # ustar cannot hold some names: nothing to test
        return
    again, listed = read_back(data)
    assert again == data
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        # Python 3.9's tarfile keeps a directory's trailing slash in some long names; 3.11's drops it
        assert [m.name.rstrip("/") for m in tar.getmembers()] == [n.rstrip("/") for n, *_ in listed]
        assert [m.size if m.isfile() else 0 for m in tar.getmembers()] == [s if k == "file" else 0 for _, k, s, _ in listed]


@settings(max_examples=60, deadline=None)
@given(entries.filter(bool), st.data())
def test_truncation_anywhere_is_a_clear_error(items, data):
    tar = make_tar(items, tarfile.PAX_FORMAT)
    body_end = len(tar.rstrip(b"\0"))
    cut = data.draw(st.integers(min_value=0, max_value=max(0, body_end + 1023 - 1)))
    cut = min(cut, len(tar) - 1)
    end_of_archive = padded(body_end) + 1024
    if cut >= end_of_archive:
        return  # only padding zeros after the end-of-archive marker were removed: still a valid archive
    with pytest.raises(BadInput):
        read_back(tar[:cut])


def test_not_a_tar_and_empty_input():
    with pytest.raises(BadInput, match="not a tar archive"):
        read_back(b"hello world" * 100)
    with pytest.raises(BadInput, match="empty input"):
        read_back(b"")


def test_data_after_the_end_marker_is_refused():
    tar = make_tar([("a", "file", b"x")], tarfile.PAX_FORMAT)
    with pytest.raises(BadInput, match="after the end-of-archive"):
        read_back(tar + b"garbage")


def test_long_names_and_base256_sizes():
    name = "d/" + "x" * 150
    header = build_header(name, 3)
    data = header + b"abc" + bytes(509) + bytes(1024)
    again, listed = read_back(data)
    assert again == data and listed[0][0] == name
    gnu = bytearray(build_header("big", 0)[-512:])
    size = 9 << 30
    gnu[124:136] = bytes([0x80]) + size.to_bytes(11, "big")
    gnu[148:156] = b" " * 8
    gnu[148:156] = b"%06o\0 " % sum(gnu)
    reader = TarReader(Source(io.BytesIO(bytes(gnu)), name="t"))
    member = next(iter(reader))
    assert member.size == size


def test_memory_stays_flat_on_an_8_gib_member_streamed_through_a_pipe(tmp_path):
    """A member of 8 GiB (PAX size record) produced as a stream, never stored on disk."""
    code = (
        "import sys; sys.path.insert(0, %r)\n"
        "from isep.tarstream import Source, TarReader\n"
        "r = TarReader(Source(sys.stdin.buffer.raw, name='pipe'))\n"
        "sizes = [(m.name, m.size, sum(len(c) for c in m.iter_data())) for m in r]\n"
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
        "print(sizes, hwm)\n" % str(os.getcwd())
    )
    writer = subprocess.Popen([sys.executable, "-c",
                               "import sys; sys.path.insert(0, %r)\n"
                               "from isep.samples import write_huge_member_archive\n"
                               "write_huge_member_archive(sys.stdout.buffer, 8 << 30)\n" % os.getcwd()],
                              stdout=subprocess.PIPE)
    reader = subprocess.run([sys.executable, "-c", code], stdin=writer.stdout, capture_output=True, timeout=600)
    writer.wait()
    assert reader.returncode == 0, reader.stderr
    listing, rss_kib = reader.stdout.decode().rsplit(" ", 1)
    (name, size, counted), = eval(listing)
    assert size == counted == 8 << 30
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent (pytest) across exec
    assert int(rss_kib) < 100 * 1024, f"peak RSS {int(rss_kib) >> 10} MiB reading an 8 GiB member"


@pytest.mark.parametrize("field,value", [
    (b"00000001000\0", 512), (b"     1000 \0\0", 512), (b"\0" * 12, 0), (b" " * 12, 0),
    (b"0001000\0\0\0\0\0", 512), (b"\x80" + (9 << 30).to_bytes(11, "big"), 9 << 30)])
def test_numeric_fields_every_reader_reads_alike(field, value):
    assert _octal(field, "size", "t") == value


@pytest.mark.parametrize("field", [
    b"\x000000001000\0",   # Go trims the leading NUL and reads 512, tarfile and GNU tar read 0
    b"000_0001000\0",      # int() accepts '_', Go refuses
    b"0001000\0" + b"12\0\0",  # something after the terminator
    b"+0001000\0\0\0\0", b"00010 00\0\0\0\0", b"00000001008\0",
    b"\xff" * 12, b"\xc0" + bytes(11),  # negative in Go's reading of base-256
    b"\x81" + bytes(11), b"\x80" + b"\xff" * 11])  # other markers; over 2**63
def test_numeric_fields_readers_disagree_on_are_refused(field):
    with pytest.raises(BadInput):
        _octal(field, "size", "t")


def test_pax_records_as_go_parses_them():
    rec = lambda k, v: _pax_record(k, v.encode() if isinstance(v, str) else v)  # noqa: E731
    assert parse_pax(rec("path", "abc") + rec("SCHILY.xattr.a", "b"), "t") == {"path": "abc", "SCHILY.xattr.a": "b"}
    refused = {
        "NUL padding": rec("path", "abc") + b"\0\0\0", "signed length": b"+" + rec("path", "abc"),
        "key twice": rec("path", "abc") + rec("path", "abd"), "NUL in path": rec("path", b"a\0bc"),
        "signed size": rec("size", "+5"), "uid not a number": rec("uid", "x1"), "empty path": rec("path", ""),
        "sparse": rec("GNU.sparse.major", "1"), "bad time": rec("mtime", "1:2"), "NUL in key": rec("a\0b", "1"),
    }
    for why, body in refused.items():
        with pytest.raises(BadInput):
            parse_pax(body, why)
