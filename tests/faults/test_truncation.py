"""Truncated, empty and foreign input: index, pack (from a file and from a pipe) and verify refuse it
with one line and the documented status, and write nothing."""
from __future__ import annotations

import random

import pytest

from . import craft
from tests.harness import copy_store, run


def _cuts(samples) -> dict[str, bytes]:
    """Inputs cut at each kind of boundary, plus inputs that are no image archive at all."""
    app = samples["docker-oci"]["app1"].read_bytes()
    members, trailer = craft.split(app)
    files = [m for m in members if m.kind == "file"]
    big = next(m for m in files if len(m.data) > 4096)
    padded = next(m for m in files if len(m.padding) >= 2)
    later = files[3]
    pax = craft.member("opt/" + "p" * 120, b"pax-named member\n")  # PAX path record
    assert pax.header[156:157] == b"x"
    with_pax = craft.build([pax] + members, trailer)
    cstore = samples["docker-cstore"]["app1"].read_bytes()
    cmembers, ctrailer = craft.split(cstore)
    gz = max((m for m in cmembers if m.data[:2] == b"\x1f\x8b"), key=lambda m: len(m.data))
    broken_gzip = craft.build([craft.member(m.name, m.data[: len(m.data) // 2]) if m is gz else m
                               for m in cmembers], ctrailer)
    plain = craft.build([craft.member("etc/hostname", b"box\n"), craft.member("README", b"hello\n")])
    legacy_v1 = craft.build([craft.member("repositories", b'{"a":{"1":"' + b"0" * 64 + b'"}}'),
                             craft.member("0" * 64 + "/layer.tar", bytes(1024))])
    return {
        "empty": b"",
        "inside-first-header": app[:100],
        "inside-a-header": app[: later.offset + 200],
        "inside-data": app[: big.data_offset + len(big.data) // 2],
        "inside-padding": app[: padded.data_offset + len(padded.data) + 1],
        "before-trailer": app[: len(app) - len(trailer)],
        "inside-trailer": app[: len(app) - 512 - 7],
        "inside-pax-record": with_pax[: 512 + 40],
        "inside-gzip-blob": cstore[: gz.data_offset + len(gz.data) // 2],
        "gzip-blob-truncated-in-whole-tar": broken_gzip,
        "stray-bytes-after-trailer": app + bytes(100),
        "garbage-after-trailer": app + b"\x01" * 512,
        "not-a-tar-random": random.Random(7).randbytes(4096),
        "not-a-tar-text": b"hello, I am not an archive\n" * 50,
        "tar-not-an-image": plain,
        "empty-tar": bytes(1024),
        "pre-1.10-docker": legacy_v1,
    }


CASES = ["empty", "inside-first-header", "inside-a-header", "inside-data", "inside-padding",
         "before-trailer", "inside-trailer", "inside-pax-record", "inside-gzip-blob",
         "gzip-blob-truncated-in-whole-tar", "stray-bytes-after-trailer", "garbage-after-trailer",
         "not-a-tar-random", "not-a-tar-text", "tar-not-an-image", "empty-tar", "pre-1.10-docker"]


@pytest.fixture(scope="module")
def cuts(samples):
    return _cuts(samples)


@pytest.mark.parametrize("case", CASES)
def test_index_refuses(case, cuts, sb):
    path = sb.put("in.tar", cuts[case])
    res = run("index", path, expect=4, sandbox=sb)
    assert res.stdout == b""


@pytest.mark.parametrize("case", CASES)
def test_pack_from_file_refuses(case, cuts, samples, sb):
    s = samples["docker-oci"]
    path = sb.put("in.tar", cuts[case])
    run("pack", path, "--base", s["inspect-base"], "--lib", s["inspect-lib"], "-o", sb.out, expect=4, sandbox=sb)
    assert not (sb.out / "isep-bundle.json").exists()


@pytest.mark.parametrize("case", CASES)
def test_pack_from_pipe_refuses(case, cuts, samples, sb):
    s = samples["docker-oci"]
    run("pack", "--base", s["inspect-base"], "--lib", s["inspect-lib"], "-o", sb.out, stdin=cuts[case],
        expect=4, sandbox=sb)


@pytest.mark.parametrize("case", ["empty", "inside-data", "inside-padding", "before-trailer",
                                  "inside-pax-record", "gzip-blob-truncated-in-whole-tar", "tar-not-an-image"])
def test_verify_reports(case, cuts, sb):
    path = sb.put("in.tar", cuts[case])
    res = run("verify", path, expect=5, report=True, sandbox=sb)
    (check,) = res.failed_checks()
    assert check["check"] == "archive"


@pytest.mark.parametrize("case", ["inside-data", "before-trailer", "tar-not-an-image"])
def test_pack_into_existing_store_changes_nothing(case, cuts, samples, stores, sb):
    """A failed pack into a store that holds a bundle leaves every file of it as it was."""
    copy_store(stores["docker-oci"], sb.out)
    run("pack", "--base", sb.out, "--lib", sb.out, "-o", sb.out, stdin=cuts[case], expect=4, sandbox=sb)
    run("verify", sb.out)


def test_pack_stream_output_of_truncated_input_is_incomplete(cuts, samples, sb):
    """-o -: a failed pack's bundle stream has no manifest, so a receiver refuses it."""
    s = samples["docker-oci"]
    res = run("pack", "--base", s["inspect-base"], "--lib", s["inspect-lib"], "-o", "-",
              stdin=cuts["inside-data"], expect=4, sandbox=sb)
    stream = sb.put("stream", res.stdout)
    run("join", "-", stdin=stream, expect=4, sandbox=sb)
    run("verify", "-", stdin=stream, expect=(4, 5), report=True, sandbox=sb)


def test_index_of_directory_and_missing_file(sb):
    run("index", sb.work, expect=2, sandbox=sb)
    run("index", sb.work / "missing.tar", expect=3, sandbox=sb)
