"""Synthetic release series for the delta tests (fast tier and engine tier): a base, a dependency
layer and a code layer, built from isep.samples' Layer and Image, changed the way real releases
change them."""
from __future__ import annotations

import random
from pathlib import Path

from isep.samples import Image, Layer, inspect_json, write_archive


def _blob(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def base_layer(release: int) -> Layer:
    files = [(f"usr/bin/tool{i}", _blob(300 + i, 30_000)) for i in range(20)]
    if release > 1:  # a security update: one binary replaced
        files[1] = ("usr/bin/tool1", _blob(7000 + release, 30_000))
    return Layer(files=files, mtime=1700000000 + release, created_by="ADD rootfs /")


def deps_layer(version: int) -> Layer:
    """pip install -r requirements.txt: version 2 bumps one package and rebuilds the layer."""
    files = [(f"usr/lib/py/pkg{i}/mod.py", _blob(100 + i, 40_000)) for i in range(30)]
    if version > 1:
        files[3] = ("usr/lib/py/pkg3/mod.py", _blob(900 + version, 40_000))
    return Layer(files=files, mtime=1710000000 + version, created_by="RUN pip install -r requirements.txt")


def code_layer(release: int) -> Layer:
    """COPY . /srv/app: one module of twenty changes per release."""
    files = [(f"srv/app/m{i}.py", _blob(200 + i, 8_000)) for i in range(20)]
    files[0] = ("srv/app/m0.py", _blob(5000 + release, 8_000))
    return Layer(files=files, mtime=1720000000 + release, created_by="COPY . /srv/app")


def releases(repo: str = "isep-delta/app") -> dict[str, Image]:
    """r1; r2 a code-only change; r3 a changed dependency layer; r4 a base update under r3's app."""
    return {
        "r1": Image(f"{repo}:1", [base_layer(1), deps_layer(1), code_layer(1)]),
        "r2": Image(f"{repo}:2", [base_layer(1), deps_layer(1), code_layer(2)]),
        "r3": Image(f"{repo}:3", [base_layer(1), deps_layer(2), code_layer(3)]),
        "r4": Image(f"{repo}:4", [base_layer(2), deps_layer(2), code_layer(3)]),
    }


def bases(repo: str = "isep-delta/base") -> dict[str, Image]:
    return {"base1": Image(f"{repo}:1", [base_layer(1)]), "base2": Image(f"{repo}:2", [base_layer(2)])}


def write_releases(out: Path, fmt: str = "docker-oci", repo: str = "isep-delta/app") -> dict[str, Path]:
    """r1..r4.tar (one image each), r2+r3.tar (two images), base1.json and base2.json (inspect)."""
    out.mkdir(parents=True, exist_ok=True)
    made = {}
    images = releases(repo)
    for key, image in images.items():
        with open(out / f"{key}.tar", "wb") as fh:
            write_archive(fh, fmt, [image])
        made[key] = out / f"{key}.tar"
    with open(out / "r2+r3.tar", "wb") as fh:
        write_archive(fh, fmt, [images["r2"], images["r3"]])
    made["r2+r3"] = out / "r2+r3.tar"
    for key, image in bases(repo.rsplit("/", 1)[0] + "/base").items():
        (out / f"{key}.json").write_text(inspect_json(image, fmt))
        made[key] = out / f"{key}.json"
    return made
