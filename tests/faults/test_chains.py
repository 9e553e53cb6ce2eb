"""Runs of extended headers: each under the 1 MiB cap, many in a row before one member. The reader
takes one extended header of each kind per member, so nothing accumulates: index and pack refuse
the run at its second header (exit 4) with memory that does not grow with the run's length."""
from __future__ import annotations

import pytest

from . import ambiguous, craft
from tests.harness import run

RUN = 300  # headers of 1 MiB minus a block: 300 MiB in a row, had the reader gathered them


@pytest.fixture(scope="module")
def chained(tmp_path_factory, samples):
    app = samples["docker-oci"]["app1"].read_bytes()
    members, trailer = craft.split(app)
    record = ambiguous.pax(comment=b"x" * ((1 << 20) - 1024))
    head = ambiguous.extended(b"x", record)
    path = tmp_path_factory.mktemp("chains") / "pax-run.tar"
    with open(path, "wb") as out:
        for _ in range(RUN):
            out.write(head)
        out.write(members[0].raw)
        for m in members[1:]:
            out.write(m.raw)
        out.write(trailer)
    return path


@pytest.mark.parametrize("cmd", ["index", "pack-file", "pack-pipe"])
def test_pax_run_is_refused_in_bounded_memory(cmd, chained, samples, sb):
    s = samples["docker-oci"]
    refs = ["--base", str(s["inspect-base"]), "--lib", str(s["inspect-lib"])]
    if cmd == "index":
        r = run("index", chained, expect=4, rss=True, sandbox=sb)
    elif cmd == "pack-file":
        r = run("pack", chained, *refs, "-o", sb.out, expect=4, rss=True, sandbox=sb)
    else:
        r = run("pack", *refs, "-o", sb.out, stdin=chained, expect=4, rss=True, sandbox=sb)
    assert "extended header" in r.error, r.error
    assert r.maxrss_kb is not None and r.maxrss_kb < 100 << 10, r.maxrss_kb
