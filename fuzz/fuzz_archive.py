"""Fuzz the archive interpreter: isep.archive.scan (one pass, digests, diffIDs of compressed
members) and build_index (format detection, manifest.json / index.json / configs, link resolution).

With ISEP_GODIFF set to a built tests/godiff binary, every input isep accepts is also read by Go's
archive/tar and encoding/json the way docker load and containerd do: a loader that would load
other images than isep's index lists is a finding (issue #11: what the loader loads is what isep
checked). Accepted inputs are rare, so this costs little."""
from _common import ROOT, main

import io
import os
import sys
import tempfile

from isep.archive import build_index, scan
from isep.tarstream import Source

sys.path.insert(0, os.path.join(ROOT, "tests"))
from faults.ambiguous import disagreements, go_read  # noqa: E402

GODIFF = os.environ.get("ISEP_GODIFF")


def test_one_input(data: bytes) -> None:
    index = build_index(scan(Source(io.BytesIO(data), prefetch=False, name="fuzz")))
    assert index["images"]
    if GODIFF:
        with tempfile.NamedTemporaryFile(suffix=".tar") as fh:
            fh.write(data)
            fh.flush()
            go, = go_read(GODIFF, [fh.name])
        problems = disagreements(index, go)
        if problems:
            raise AssertionError(f"the loaders read this archive otherwise: {problems}")


if __name__ == "__main__":
    main(test_one_input)
