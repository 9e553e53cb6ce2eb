"""Fuzz the archive interpreter: isep.archive.scan (one pass, digests, diffIDs of compressed
members) and build_index (format detection, manifest.json / index.json / configs, link resolution)."""
from _common import main

import io

from isep.archive import build_index, scan
from isep.tarstream import Source


def test_one_input(data: bytes) -> None:
    index = build_index(scan(Source(io.BytesIO(data), prefetch=False, name="fuzz")))
    assert index["images"]


if __name__ == "__main__":
    main(test_one_input)
