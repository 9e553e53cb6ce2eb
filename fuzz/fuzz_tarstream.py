"""Fuzz isep.tarstream.TarReader over arbitrary bytes: members, their data and padding, the trailer."""
from _common import main

import io

from isep.tarstream import Source, TarReader


def test_one_input(data: bytes) -> None:
    reader = TarReader(Source(io.BytesIO(data), prefetch=False, name="fuzz"))
    total = 0
    for member in reader:
        _ = (member.kind, member.is_file, member.raw_size, member.name, member.linkname, member.pax)
        if member.size and total < (1 << 20):
            for chunk in member.iter_data():
                total += len(chunk)
    assert reader.trailer.count(0) == len(reader.trailer)


if __name__ == "__main__":
    main(test_one_input)
