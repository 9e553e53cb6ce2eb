"""Decompression bombs: a tiny part that expands hugely, a zstd frame that asks for a huge window, a
compressed member of an archive that expands a thousandfold. Every command fails cleanly or
succeeds, in bounded memory (the child's peak RSS, from wait4) and time."""
from __future__ import annotations

import pytest

from . import craft
from tests.harness import copy_store, is_complete_archive, part_files, run

RSS_LIMIT_KB = 320 * 1024   # Python + isep (~60 MiB) + the largest zstd window isep accepts (128 MiB)


def huge_window_frame(window_log: int = 31) -> bytes:
    """A minimal zstd frame (no content size) whose header asks for a 2**window_log-byte window."""
    exponent = window_log - 10
    return b"\x28\xb5\x2f\xfd" + bytes([0x00, exponent << 3]) + bytes([0x21, 0x00, 0x00]) + b"tar!"


def _bombed_store(stores, sb, key: str, stored: bytes, role: str = "app", **kw):
    store = copy_store(stores[key], sb.work / "store")
    craft.forge_part(store, part_files(store)[role], stored=stored, **kw)
    return store


@pytest.mark.parametrize("case", ["zstd-1GiB", "zstd-window-2GiB", "zstd-window-ok-but-garbage"])
def test_zstd_part_bombs(case, stores, sb):
    stored = {"zstd-1GiB": lambda: craft.zstd_zeros(1 << 30),
              "zstd-window-2GiB": lambda: huge_window_frame(31),
              "zstd-window-ok-but-garbage": lambda: huge_window_frame(20)}[case]()
    assert len(stored) < 64 << 10
    store = _bombed_store(stores, sb, "docker-oci", stored)  # every hash in the manifest matches
    res = run("join", store, expect=5, sandbox=sb, timeout=60, rss=True)
    assert res.maxrss_kb < RSS_LIMIT_KB and not is_complete_archive(res.stdout)
    res = run("verify", store, expect=5, report=True, sandbox=sb, timeout=60, rss=True)
    assert res.maxrss_kb < RSS_LIMIT_KB
    assert part_files(store)["app"] in {c.get("part") for c in res.failed_checks()}
    res = run("verify", "--deep", store, expect=5, report=True, sandbox=sb, timeout=60, rss=True)
    assert res.maxrss_kb < RSS_LIMIT_KB


def test_gzip_part_bomb(stores, sb):
    """512 MiB of zeros in a 512 KiB gzip part: join stops at the size the manifest declares."""
    store = _bombed_store(stores, sb, "gzip", craft.gzip_zeros(512 << 20))
    res = run("join", store, expect=5, sandbox=sb, timeout=60, rss=True)
    assert res.maxrss_kb < RSS_LIMIT_KB and "expands beyond" in res.error
    res = run("verify", store, expect=5, report=True, sandbox=sb, timeout=60, rss=True)
    assert res.maxrss_kb < RSS_LIMIT_KB


def test_part_declaring_a_huge_raw_size(stores, sb):
    """A part that claims to expand to 1 TiB (and does expand to 1 GiB): the tar inside ends the
    read (a zero block, then at most 64 MiB of zeros) long before."""
    store = _bombed_store(stores, sb, "docker-oci", craft.zstd_zeros(1 << 30), raw_size=1 << 40)
    res = run("join", store, expect=5, sandbox=sb, timeout=60, rss=True)
    assert res.maxrss_kb < RSS_LIMIT_KB


@pytest.mark.parametrize("kind,size", [("gzip", 320 << 20), ("zstd", 512 << 20)])
def test_compressed_member_bombs_in_an_archive(kind, size, samples, sb):
    """A member that starts like gzip/zstd is decompressed to compute its diffID: the output is
    hashed piece by piece (it used to be one allocation of the whole expansion per 1 MiB read)."""
    blob = craft.gzip_zeros(size) if kind == "gzip" else craft.zstd_zeros(size)
    s = samples["docker-oci"]
    archive = craft.with_members(s["app1"].read_bytes(), [craft.member("bomb.bin", blob)], at="start")
    path = sb.put("in.tar", archive)
    res = run("index", path, sandbox=sb, timeout=60, rss=True)
    assert res.maxrss_kb < RSS_LIMIT_KB
    bomb = next(m for m in res.json["members"] if m["name"] == "bomb.bin")
    assert bomb["compression"] == kind
    res = run("pack", "--base", s["inspect-base"], "--lib", s["inspect-lib"], "-o", sb.out, stdin=archive,
              sandbox=sb, timeout=60, rss=True)
    assert res.maxrss_kb < RSS_LIMIT_KB


def test_member_with_a_huge_zstd_window(samples, sb):
    s = samples["docker-oci"]
    archive = craft.with_members(s["app1"].read_bytes(), [craft.member("win.zst", huge_window_frame(31))])
    res = run("index", sb.put("in.tar", archive), expect=4, sandbox=sb, rss=True)
    assert res.maxrss_kb < RSS_LIMIT_KB and "zstd" in res.error


def test_many_small_json_members_are_bounded(samples, sb):
    """80 MiB of JSON-looking members (4 MiB each): index, pack from a file and from a pipe refuse
    it at the same 64 MiB limit (pack kept every one of them in memory before)."""
    s = samples["docker-oci"]
    blob = b"{" + b" " * ((4 << 20) - 2) + b"}"
    archive = craft.with_members(s["app1"].read_bytes(), [craft.member(f"junk/{i:02d}.json", blob) for i in range(20)])
    path = sb.put("in.tar", archive)
    for res in (run("index", path, expect=4, sandbox=sb, rss=True),
                run("pack", path, "--base", s["inspect-base"], "-o", sb.out, expect=4, sandbox=sb, rss=True),
                run("pack", "--base", s["inspect-base"], "-o", sb.out, stdin=path, expect=4, sandbox=sb, rss=True)):
        assert res.maxrss_kb < RSS_LIMIT_KB and "MiB of JSON members" in res.error


def test_held_v1_siblings_are_bounded(samples, sb):
    """A pipe pack holds a legacy <v1id>/ folder's small members until its layer.tar arrives; 20
    folders of two 4 MiB members (a name repeated is refused since issue #11, so one folder holds
    at most its json and VERSION) do not pile up in memory."""
    s = samples["docker-legacy"]
    extra = [craft.member(f"{i:064x}/{leaf}", b"x" * (4 << 20)) for i in range(20) for leaf in ("json", "VERSION")]
    archive = craft.with_members(s["app1"].read_bytes(), extra, at="start")
    res = run("pack", "--base", s["inspect-base"], "--lib", s["inspect-lib"], "-o", sb.out, stdin=archive,
              sandbox=sb, timeout=60, rss=True)
    assert res.maxrss_kb < 200 * 1024
    assert run("join", sb.out, sandbox=sb).stdout == archive
