"""Differential test (issue #11, group 2): what isep-index sees in an archive is what the loaders
load. tests/godiff reads every archive with Go's archive/tar and encoding/json the way docker load
(extraction, cleaned paths, last copy wins) and containerd's importer do; for the real fixtures and
the sample sets both must agree, and for each crafted ambiguity isep must agree or refuse (exit 4)."""
from __future__ import annotations

import io
import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.harness import ISULA, REAL, isep
from tests.faults import ambiguous, craft
from isep.archive import index_stream
from isep.errors import IsepError
from isep.tarstream import Source

REAL_ARCHIVES = sorted(REAL.glob("*/*.tar")) + [ISULA / "app1-normal.tar"]


@pytest.fixture(scope="session")
def godiff(tmp_path_factory):
    binary = ambiguous.build_godiff(tmp_path_factory.mktemp("godiff"))
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail("go is not installed (tests/run.sh installs golang-go): the differential test cannot run")
        pytest.skip("go is not installed (apt-get install golang-go)")
    return binary


def isep_index(data: bytes):
    """(status, index or error message) of isep's reader, in process."""
    try:
        return 0, index_stream(Source(io.BytesIO(data), prefetch=False, name="in.tar"))
    except IsepError as exc:
        return int(exc.status), str(exc)


def check(name: str, data: bytes, go: dict, refusals=(4,)) -> str:
    """'agree' or 'refused'; fails when isep accepts what a Go loader reads otherwise."""
    status, found = isep_index(data)
    if status:
        assert status in refusals, f"{name}: exit {status}, not {refusals}: {found}"
        return "refused"
    problems = ambiguous.disagreements(found, go)
    assert not problems, f"{name}: isep accepted an archive the loaders read otherwise: {problems}"
    return "agree"


def test_real_fixtures_agree(godiff):
    assert len(REAL_ARCHIVES) == 37
    views = ambiguous.go_read(godiff, REAL_ARCHIVES)
    for path, go in zip(REAL_ARCHIVES, views):
        assert check(str(path), path.read_bytes(), go) == "agree"


def test_sample_sets_agree(godiff, samples):
    paths = [p for s in samples.values() for k, p in s.items() if not k.startswith("inspect-")]
    assert len(paths) >= 30
    for path, go in zip(paths, ambiguous.go_read(godiff, paths)):
        assert check(str(path), path.read_bytes(), go) == "agree"


@pytest.fixture(scope="module")
def crafted(samples, tmp_path_factory):
    cases = ambiguous.corpus(samples)
    root = tmp_path_factory.mktemp("crafted")
    for name, data in cases.items():
        (root / f"{name}.tar").write_bytes(data)
    return cases, root


def test_crafted_ambiguities_agree_or_are_refused(godiff, crafted):
    cases, root = crafted
    views = ambiguous.go_read(godiff, [root / f"{name}.tar" for name in cases])
    outcome = {name: check(name, data, go) for (name, data), go in zip(cases.items(), views)}
    accepted = sorted(n for n, o in outcome.items() if o == "agree")
    assert accepted == sorted(n for n in cases if n.startswith("ok-")), set(accepted) ^ {n for n in cases if n.startswith("ok-")}
    # the crafted cases are not all trivially refused by Go itself: most of them fool a loader
    fooled = [n for n, go in zip(cases, views) if not go.get("tar_error")]
    assert len(fooled) > len(cases) // 2


def test_refusals_name_the_member_and_offset(crafted, tmp_path):
    cases, root = crafted
    for name in ("manifest-dot-slash", "size-leading-nul", "directory-with-data", "two-pax-headers",
                 "longname-and-pax-path", "old-gnu-sparse", "size-underscore", "Config-and-config"):
        res = isep("index", root / f"{name}.tar", check=4)
        assert len(res.error_lines) == 1 and res.stdout == b"", (name, res.stderr)
        line = res.error_lines[0]
        assert line.startswith("isep-index: error: ")
        assert "byte " in line or "manifest.json" in line, (name, line)


# header bytes worth trying in a mutated header: terminators, digits, separators, base-256 markers
INTERESTING = [0, 0x20, ord("0"), ord("7"), ord("8"), ord("_"), ord("/"), ord("."), 0x80, 0xC0, 0xFF]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(st.data())
def test_mutated_headers_agree_or_are_refused(godiff, samples, tmp_path, data):
    """A byte of some member's header changed (checksum fixed up): isep and Go agree, or isep refuses."""
    fmt = data.draw(st.sampled_from(["docker-oci", "podman", "docker-legacy"]))
    members, trailer = craft.split(samples[fmt]["app1"].read_bytes())
    n = data.draw(st.integers(0, len(members) - 1))
    offset = data.draw(st.integers(0, 511).filter(lambda o: not 148 <= o < 156))
    value = data.draw(st.sampled_from(INTERESTING) | st.integers(0, 255))
    m = members[n]
    members[n] = ambiguous.with_field(m, offset, bytes([value]))
    archive = craft.build(members, trailer)
    path = tmp_path / "mutated.tar"
    path.write_bytes(archive)
    go, = ambiguous.go_read(godiff, [path])
    # a mutated name can also make a blob's name differ from its digest: an integrity refusal (5)
    check(f"{fmt} member {n} byte {offset} = {value:#x}", archive, go, refusals=(4, 5))


def test_disagreement_is_detected(godiff, samples, tmp_path):
    """The comparison itself can fail: a manifest.json with another tag read as isep's is not."""
    s = samples["docker-oci"]
    archive = s["app1"].read_bytes()
    status, index = isep_index(archive)
    path = tmp_path / "x.tar"
    path.write_bytes(craft.replace(archive, "manifest.json", json.dumps(
        [dict(json.loads(craft.get(archive, "manifest.json"))[0], RepoTags=["other:1"])]).encode()))
    go, = ambiguous.go_read(godiff, [path])
    assert status == 0 and ambiguous.disagreements(index, go)
