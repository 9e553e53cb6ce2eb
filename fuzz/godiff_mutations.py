"""Mutation runs against the loaders' Go parsers (issue #11): sample archives of every format with
1-3 header bytes of random members changed (checksums fixed up), or with 1-2 bytes changed, removed
or inserted in manifest.json / index.json / oci-layout / repositories (`--json`); every archive
isep accepts is read by tests/godiff and must load as isep's index says. Prints one line per kind
of disagreement and keeps those archives in the work directory.

    python fuzz/godiff_mutations.py --seed 1 --count 3000 [--json] [--work /tmp/godiff-mutations]
"""
from __future__ import annotations

import argparse
import io
import os
import random
import sys
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from faults import ambiguous, craft  # noqa: E402
from isep.archive import index_stream  # noqa: E402
from isep.errors import IsepError  # noqa: E402
from isep.samples import write_sample_set  # noqa: E402
from isep.tarstream import Source  # noqa: E402

FORMATS = ("docker-oci", "podman", "docker-legacy", "docker-cstore", "oci-archive")
INTERESTING = [0, 0x20, ord("0"), ord("7"), ord("8"), ord("_"), ord("/"), ord("."), 0x80, 0xC0, 0xFF]
METADATA = ("manifest.json", "index.json", "oci-layout", "repositories")
JSON_BYTES = b'"{}[],:0123456789abcdefABCDEFMmLlCcsS\\ '


def mutate_headers(rng: random.Random, members: list) -> None:
    for _ in range(rng.choice([1, 1, 2, 3])):
        n = rng.randrange(len(members))
        offset = rng.choice([o for o in range(512) if not 148 <= o < 156])
        value = rng.choice(INTERESTING) if rng.random() < 0.6 else rng.randrange(256)
        members[n] = ambiguous.with_field(members[n], offset, bytes([value]))


def mutate_json(rng: random.Random, members: list) -> None:
    n = rng.choice([i for i, m in enumerate(members) if m.name in METADATA])
    data = bytearray(members[n].data)
    for _ in range(rng.choice([1, 1, 2])):
        pos, how = rng.randrange(len(data)), rng.random()
        if how < 0.5:
            data[pos] = rng.choice(JSON_BYTES)
        elif how < 0.75:
            del data[pos]
        else:
            data[pos:pos] = bytes([rng.randrange(32, 127)])
    members[n] = craft.member(members[n].name, bytes(data))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--work", default="/tmp/godiff-mutations")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sets = {f: write_sample_set(work / f, f, layer_kib=8) for f in FORMATS}
    binary = ambiguous.build_godiff(work)
    if binary is None:
        print("go is not installed", file=sys.stderr)
        return 3
    rng = random.Random(args.seed)
    kinds: dict[str, Path] = {}
    accepted = 0
    for i in range(args.count):
        members, trailer = craft.split(sets[rng.choice(FORMATS)][rng.choice(["app1", "app1+app2"])].read_bytes())
        (mutate_json if args.json else mutate_headers)(rng, members)
        data = craft.build(members, trailer)
        try:
            index = index_stream(Source(io.BytesIO(data), prefetch=False, name=f"m{i}"))
        except IsepError:
            continue
        accepted += 1
        path = work / f"m{i}.tar"
        path.write_bytes(data)
        problems = ambiguous.disagreements(index, ambiguous.go_read(binary, [path])[0])
        if problems and problems[0][:60] not in kinds:
            kinds[problems[0][:60]] = path
            print(path, problems[0][:300])
        elif not problems:
            path.unlink()
    print(f"{args.count} mutations, {accepted} accepted by isep, {len(kinds)} kinds of disagreement")
    return 1 if kinds else 0


if __name__ == "__main__":
    sys.exit(main())
