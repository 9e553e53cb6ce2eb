"""Archives that isep and a loader could read differently (issue #11, group 2; the corpus is in
ambiguous.py, the comparison with Go's readers in tests/test_differential.py): through the real
commands, each is refused with exit 4 and one error line naming the member and its byte offset (or
the metadata member), nothing written; the well-formed neighbours (`ok-*`) pack and join byte for byte
(members appended after the final metadata come before it: join writes that metadata last)."""
from __future__ import annotations

import pytest

from . import ambiguous, craft
from tests.harness import run

REFUSED_PACKED = 3  # every third refused case also goes through pack from a pipe (same reader)


@pytest.fixture(scope="module")
def corpus(samples):
    return ambiguous.corpus(samples)


def _names():
    return sorted(ambiguous.CASE_NAMES)


@pytest.mark.parametrize("case", [n for n in _names() if not n.startswith("ok-")])
def test_ambiguous_archive_is_refused(case, corpus, samples, sb):
    path = sb.put("in.tar", corpus[case])
    res = run("index", path, expect=4, sandbox=sb)
    assert res.stdout == b""
    assert "byte " in res.error or ".json" in res.error or "repositories" in res.error, res.error
    if _names().index(case) % REFUSED_PACKED == 0:
        s = samples["docker-oci"]
        sb.out.mkdir()
        run("pack", "--base", s["inspect-base"], "-o", sb.out / "piped", stdin=corpus[case], expect=4, sandbox=sb)
        assert sorted(sb.out.iterdir()) == []


@pytest.mark.parametrize("case", [n for n in _names() if n.startswith("ok-")])
def test_unambiguous_neighbour_packs_and_joins_byte_for_byte(case, corpus, samples, sb):
    fmt = "podman" if "link" in case else "docker-oci"
    s = samples[fmt]
    path = sb.put("in.tar", corpus[case])
    run("index", path, sandbox=sb)
    sb.out.mkdir()
    run("pack", path, "--base", s["inspect-base"], "--lib", s["inspect-lib"], "-o", sb.out / "store", sandbox=sb)
    assert run("join", sb.out / "store", sandbox=sb).stdout == craft.metadata_last(corpus[case])
