"""Fuzz the JSON loaders: isep.archive.load_json, isep.bundle.parse_manifest, and what join and
verify do with a manifest that parsed (part lookup, layer paths, stream order)."""
from _common import main

from isep.archive import load_json
from isep.bundle import parse_manifest
from isep.bundle import check_coverage, check_order, find_part, select_image
from isep.join import plan_copies


def test_one_input(data: bytes) -> None:
    load_json(data, "fuzz")
    doc = parse_manifest(data, "fuzz")
    for image in doc["images"]:
        entries = [e for e in (find_part(doc, f) for f in image["parts"]) if e is not None]
        check_coverage(image, entries)
        check_order(image, entries)
        plan_copies(entries, image)
    if doc["images"]:
        select_image(doc["images"], None, "fuzz") if len(doc["images"]) == 1 else None


if __name__ == "__main__":
    main(test_one_input)
