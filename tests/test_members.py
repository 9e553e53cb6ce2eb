"""Archives of many members: every command accepts what isep-pack calls complete (the JSON caps
follow from one member limit, isep.limits), beyond the limit index and pack refuse before writing
anything, and pack's memory grows by a bounded amount per member (docs/formats.md, "Limits")."""
from __future__ import annotations

import json

import pytest

from isep import bundle, join, limits
from isep.errors import BadInput
from isep.samples import write_crowded_archive
from tests.harness import run

PEAK_KIB_100K = 170 << 10   # docs/formats.md: pack's, verify's and join's peak RSS for 100,000 members
# (pack: 144 MiB from a file, of which ~20 MiB are compression frames kept for reuse, not per member)


def crowded(path, samples, count: int):
    with open(path, "wb") as out, open(samples["docker-oci"]["app1"], "rb") as app:
        write_crowded_archive(out, app, count)
    return path


def _refs(samples) -> list[str]:
    s = samples["docker-oci"]
    return ["--base", str(s["inspect-base"]), "--lib", str(s["inspect-lib"])]


def test_caps_follow_from_the_member_limit():
    assert limits.INDEX_CAP == limits.FIXED_JSON + limits.MAX_MEMBERS * limits.MEMBER_JSON
    assert limits.INDEX_CAP < limits.PLAN_CAP <= limits.MANIFEST_CAP == bundle.MANIFEST_CAP
    assert limits.DOCUMENT_CAP >= limits.MANIFEST_CAP


def test_manifest_over_the_cap_is_refused_when_written(monkeypatch):
    doc = bundle.new_manifest()
    doc["parts"].append({"file": "a.tar.zst", "members": [{"seq": n, "name": f"m{n}"} for n in range(100)]})
    data = bundle.encode_manifest(doc)
    assert json.loads(bytes(data))["parts"][0]["members"][99] == {"seq": 99, "name": "m99"}
    monkeypatch.setattr(bundle, "MANIFEST_CAP", len(data) - 1)
    with pytest.raises(BadInput, match="over the"):
        bundle.encode_manifest(doc)


def test_manifest_records_share_repeated_values():
    """Equal type and digest values of many member records are one object (join's and verify's
    memory per member), names are not merged, and every value reads as written."""
    empty = "sha256:" + "e3" * 32
    doc = bundle.new_manifest()
    doc["parts"].append({"file": "a.tar.zst", "role": "app", "compression": "zstd", "size": 1, "raw_size": 1,
                         "sha256": "sha256:" + "00" * 32,
                         "members": [{"seq": n, "name": f"m{n}", "type": "file", "size": 0, "sha256": empty}
                                     for n in range(3)]})
    members = bundle.parse_manifest(bytes(bundle.encode_manifest(doc)), "t")["parts"][0]["members"]
    assert members == doc["parts"][0]["members"]
    assert members[0]["sha256"] is members[2]["sha256"] and members[0]["type"] is members[1]["type"]


def test_join_keeps_the_manifest_record_only_when_it_agrees():
    want = {"seq": 0, "name": "l.tar.gz", "sha256": "sha256:aa", "diff_id": "sha256:bb"}
    assert join._digests_to_keep({"sha256": "sha256:aa", "diff_id": "sha256:bb"}, want) is want
    other = {"sha256": "sha256:aa", "diff_id": "sha256:cc"}
    assert join._digests_to_keep(other, want) is other
    plain = {"sha256": "sha256:aa"}  # the manifest's diff_id must not stand for an uncompressed member's
    assert join._digests_to_keep(plain, want) is plain
    assert join._digests_to_keep(plain, None) is plain


def test_20k_members_every_command(samples, tmp_path):
    """index | partition, pack (plan, file, pipe, stream), verify and join all accept 20,000 members."""
    archive = crowded(tmp_path / "crowd.tar", samples, 20_000)
    index = run("index", archive).stdout
    assert len(index) > 4 << 20  # over the old 4 MiB cap that refused it
    plan = tmp_path / "plan.json"
    plan.write_bytes(run("partition", *_refs(samples), stdin=index).stdout)
    run("pack", archive, "--plan", plan, "-o", tmp_path / "by-plan")
    run("pack", archive, *_refs(samples), "-o", tmp_path / "by-file")
    run("pack", *_refs(samples), "-o", tmp_path / "by-pipe", stdin=archive)
    stream = run("pack", archive, *_refs(samples), "-o", "-").stdout
    for store in ("by-plan", "by-file", "by-pipe"):
        run("verify", tmp_path / store)
        assert run("join", tmp_path / store).stdout == archive.read_bytes()
    assert run("join", "-", stdin=stream).stdout == archive.read_bytes()


@pytest.mark.slow
def test_100k_members_memory(samples, tmp_path):
    """pack, verify and join of 100,000 members (a store and a stream) stay under the documented peak."""
    archive = crowded(tmp_path / "crowd.tar", samples, 100_000)
    runs = [run("pack", archive, *_refs(samples), "-o", tmp_path / "st", rss=True, timeout=600),
            run("verify", tmp_path / "st", rss=True, timeout=600),
            run("join", tmp_path / "st", "-o", tmp_path / "out.tar", rss=True, timeout=600)]
    stream = tmp_path / "bundle.stream"
    stream.write_bytes(run("pack", archive, *_refs(samples), "-o", "-", timeout=600).stdout)
    runs += [run("verify", "-", stdin=stream, rss=True, timeout=600),
             run("join", "-", "-o", tmp_path / "out2.tar", stdin=stream, rss=True, timeout=600)]
    for r in runs:
        assert r.maxrss_kb is not None and r.maxrss_kb < PEAK_KIB_100K, r.maxrss_kb
    assert (tmp_path / "out.tar").read_bytes() == archive.read_bytes()
    assert (tmp_path / "out2.tar").read_bytes() == archive.read_bytes()


@pytest.mark.slow
def test_over_the_member_limit_is_refused(samples, tmp_path):
    archive = crowded(tmp_path / "crowd.tar", samples, limits.MAX_MEMBERS + 1)
    r = run("pack", archive, *_refs(samples), "-o", tmp_path / "st", expect=4, timeout=600)
    assert f"over {limits.MAX_MEMBERS:,} members" in r.error
    assert not (tmp_path / "st").exists() or not list((tmp_path / "st").iterdir())
    r = run("index", archive, expect=4, timeout=600)
    assert r.stdout == b""
