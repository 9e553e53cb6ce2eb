#!/usr/bin/env python3
"""Realistic release pairs for the delta benchmark: layer tars built from real packages.

    python bench/release_pairs.py [--cache DIR] [--out DIR] [--pairs a,b,c,d,e]

Each layer is installed the way a Dockerfile RUN or COPY would make it, then written as a layer tar
(uid/gid 0, names sorted, mtimes truncated to seconds, as Docker's archive package writes them):

| layer | built from | like |
|---|---|---|
| base  | Debian 12 .debs (`apt-get download` + `dpkg-deb -x`; mtimes from the packages) | a debootstrap base |
| lib   | Debian's python3.11 .debs, same way | `RUN apt-get install python3.11` |
| deps  | `pip install --target /app/deps` from downloaded wheels (mtimes of install time, .pyc compiled) | `RUN pip install -r requirements.txt` |
| code  | a real project's wheel at two consecutive releases, its files' own dates | `COPY src/ /app/code` |
| node  | `npm install` into /app/node (mtimes of install time) | `RUN npm ci` |

Pairs (release 1 -> release 2):
  a  dependency bump (pandas, requests, urllib3 by a patch release, reinstalled) + code change
  b  code-only change; the deps layer is byte-identical (a build-cache hit)
  c  deps layer rebuilt by CI with the same packages: only timestamps (and .pyc headers) change
  d  base security update (openssl/libssl3 3.0.20 -> 3.0.22) under an unchanged lib and app
  e  npm dependency bump (typescript and express by a patch release)

Downloads go to --cache (wheels, .debs, npm's cache), installed trees and layer tars to --out; a
rerun reuses both (delete a layer tar to rebuild it). Writes OUT/pairs.json describing every pair.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

DEFAULT_ROOT = Path(os.environ.get("ISEP_PAIRS_DIR", Path.home() / ".cache" / "isep-release-pairs"))

BASE_DEBS = ["base-files", "bash", "coreutils", "dash", "debianutils", "diffutils", "findutils", "grep",
             "gzip", "hostname", "libc-bin", "libc6", "libgcc-s1", "libstdc++6", "zlib1g", "sed", "tar",
             "tzdata", "ca-certificates", "libacl1", "libattr1", "libselinux1", "libpcre2-8-0", "libgmp10",
             "libzstd1", "liblzma5", "libbz2-1.0", "libcrypt1", "libtinfo6", "libssl3", "openssl"]
OPENSSL_OLD = "3.0.20-1~deb12u2"   # bookworm
OPENSSL_NEW = "3.0.22-1~deb12u2"   # bookworm-security
LIB_DEBS = ["python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib", "python3.11",
            "libexpat1", "libffi8", "libsqlite3-0", "libncursesw6", "libreadline8", "libuuid1",
            "libnsl2", "libtirpc3", "libdb5.3", "media-types", "readline-common"]

DEPS_R1 = ["numpy==2.1.2", "pandas==2.2.2", "requests==2.32.2", "urllib3==2.2.2", "idna==3.10",
           "charset-normalizer==3.4.0", "certifi==2024.8.30", "python-dateutil==2.9.0.post0",
           "pytz==2024.2", "tzdata==2024.2", "six==1.16.0", "pyyaml==6.0.2", "jinja2==3.1.4",
           "markupsafe==3.0.2", "click==8.1.7", "sqlalchemy==2.0.35", "greenlet==3.1.1",
           "typing-extensions==4.12.2"]
DEPS_R2 = [{"pandas==2.2.2": "pandas==2.2.3", "requests==2.32.2": "requests==2.32.3",
            "urllib3==2.2.2": "urllib3==2.2.3"}.get(p, p) for p in DEPS_R1]
CODE_R1, CODE_R2 = "rich==13.7.0", "rich==13.7.1"
NODE_R1 = ["typescript@5.6.2", "express@4.21.0", "lodash@4.17.21", "moment@2.30.1"]
NODE_R2 = ["typescript@5.6.3", "express@4.21.1", "lodash@4.17.21", "moment@2.30.1"]

STEPS = {"base": "ADD rootfs.tar /", "lib": "RUN apt-get install -y python3.11",
         "deps": "RUN pip install --target /app/deps -r requirements.txt", "code": "COPY src/ /app/code",
         "node": "RUN npm ci --prefix /app/node"}  # the config history's created_by of each layer


def run(argv: list[str], **kw) -> None:
    print("+", " ".join(argv), file=sys.stderr)
    subprocess.run(argv, check=True, **kw)


# --- fetching (cached) ---------------------------------------------------------------------------

def fetch_wheels(specs: list[str], cache: Path) -> Path:
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    for spec in specs:  # one at a time: pip refuses two versions of one project in one call
        if find_wheel(spec, wheels) is None:
            run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--no-deps",
                 "-d", str(wheels), spec])
    return wheels


def find_wheel(spec: str, wheels: Path) -> Path | None:
    name, version = spec.split("==")
    prefix = f"{name.replace('-', '_').lower()}-{version}-"
    hits = sorted(p for p in wheels.glob("*.whl") if p.name.lower().startswith(prefix))
    return hits[-1] if hits else None


def fetch_debs(packages: list[str], cache: Path) -> list[Path]:
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    found = []
    for pkg in packages:
        name, _, version = pkg.partition("=")
        pattern = f"{name}_{version.replace(':', '%3a') if version else '*'}_*.deb"
        hits = sorted(debs.glob(pattern))
        if not hits:
            run(["apt-get", "download", "-q", pkg], cwd=debs)
            hits = sorted(debs.glob(pattern))
        if not hits:
            raise SystemExit(f"apt-get download {pkg} produced no {pattern}")
        found.append(hits[-1])
    return found


# --- installing ----------------------------------------------------------------------------------

def install_debs(debs: list[Path], root: Path) -> None:
    """dpkg-deb -x keeps the packages' own mtimes, as dpkg does; the status file is written now."""
    for deb in debs:
        run(["dpkg-deb", "-x", str(deb), str(root)])
    status = root / "var/lib/dpkg/status"
    status.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for deb in debs:
        fields = subprocess.run(["dpkg-deb", "-f", str(deb), "Package", "Version", "Architecture"],
                                check=True, capture_output=True, text=True).stdout
        lines.append(fields.strip() + "\nStatus: install ok installed\n")
    status.write_text("\n".join(lines))


def pip_install(specs: list[str], wheels: Path, root: Path) -> None:
    target = root / "app/deps"
    run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--find-links",
         str(wheels), "--target", str(target), *specs])


def copy_wheel_sources(spec: str, wheels: Path, root: Path) -> None:
    """The project's files with the dates its wheel records (a COPY of a checkout)."""
    wheel = find_wheel(spec, wheels)
    dest = root / "app/code"
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            if info.is_dir() or ".dist-info/" in info.filename:
                continue
            path = dest / info.filename
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(zf.read(info))
            stamp = time.mktime(info.date_time + (0, 0, -1))
            os.utime(path, (stamp, stamp))


def npm_install(packages: list[str], cache: Path, root: Path) -> None:
    prefix = root / "app/node"
    prefix.mkdir(parents=True, exist_ok=True)
    run(["npm", "install", "--prefix", str(prefix), "--cache", str(cache / "npm"), "--prefer-offline",
         "--no-audit", "--no-fund", "--no-package-lock", "--loglevel=error", *packages])


# --- layer tars ----------------------------------------------------------------------------------

def _normalise(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = int(info.mtime)
    return info


def write_layer(root: Path, out: Path) -> None:
    tmp = out.with_suffix(".tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            rel = os.path.relpath(dirpath, root)
            if rel != ".":
                tar.add(dirpath, arcname=rel, recursive=False, filter=_normalise)
            for name in sorted(filenames):
                tar.add(os.path.join(dirpath, name), arcname=os.path.normpath(os.path.join(rel, name)),
                        recursive=False, filter=_normalise)
    tmp.rename(out)


def build_layer(out: Path, install) -> Path:
    """Install into a fresh tree and tar it, unless the tar is already there."""
    if out.exists():
        return out
    tree = out.with_suffix(".tree")
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir(parents=True)
    install(tree)
    write_layer(tree, out)
    shutil.rmtree(tree)
    return out


# --- the pairs -----------------------------------------------------------------------------------

def build_all(cache: Path, out: Path, wanted: set[str]) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    layers: dict[str, Path] = {}
    need_python = wanted & {"a", "b", "c", "d"}
    if need_python:
        wheels = fetch_wheels(sorted(set(DEPS_R1 + DEPS_R2 + [CODE_R1, CODE_R2])), cache)
        layers["deps1"] = build_layer(out / "deps1.tar", lambda t: pip_install(DEPS_R1, wheels, t))
        layers["code1"] = build_layer(out / "code1.tar", lambda t: copy_wheel_sources(CODE_R1, wheels, t))
    if wanted & {"a", "b"}:
        layers["code2"] = build_layer(out / "code2.tar", lambda t: copy_wheel_sources(CODE_R2, wheels, t))
    if "a" in wanted:
        layers["deps2"] = build_layer(out / "deps2.tar", lambda t: pip_install(DEPS_R2, wheels, t))
    if "c" in wanted:  # the same requirements installed again, later
        layers["deps1b"] = build_layer(out / "deps1b.tar", lambda t: pip_install(DEPS_R1, wheels, t))
    if wanted & {"a", "d"}:
        others = [p for p in BASE_DEBS if p not in ("libssl3", "openssl")]
        base_old = fetch_debs(others + [f"libssl3={OPENSSL_OLD}", f"openssl={OPENSSL_OLD}"], cache)
        layers["base1"] = build_layer(out / "base1.tar", lambda t: install_debs(base_old, t))
        layers["lib1"] = build_layer(out / "lib1.tar", lambda t: install_debs(fetch_debs(LIB_DEBS, cache), t))
    if "d" in wanted:
        base_new = fetch_debs(others + [f"libssl3={OPENSSL_NEW}", f"openssl={OPENSSL_NEW}"], cache)
        layers["base2"] = build_layer(out / "base2.tar", lambda t: install_debs(base_new, t))
    if "e" in wanted:
        layers["node1"] = build_layer(out / "node1.tar", lambda t: npm_install(NODE_R1, cache, t))
        layers["node2"] = build_layer(out / "node2.tar", lambda t: npm_install(NODE_R2, cache, t))

    def image(*names, repo="apps/web"):
        return {"repository": repo, "layers": [layer(n) for n in names]}

    def layer(key):
        name = re.sub(r"\d+b?$", "", key)  # deps1b -> deps
        return {"name": name, "file": str(layers[key]), "created_by": STEPS[name],
                "role": name if name in ("base", "lib") else "app"}

    pairs = {  # key: (title, release 1's layers, release 2's layers)
        "a": ("dependency bump + code change", ("base1", "lib1", "deps1", "code1"),
              ("base1", "lib1", "deps2", "code2")),
        "b": ("code-only change, deps layer byte-identical", ("deps1", "code1"), ("deps1", "code2")),
        "c": ("deps layer rebuilt, only timestamps changed", ("deps1", "code1"), ("deps1b", "code1")),
        "d": ("base security update (openssl), lib and app unchanged", ("base1", "lib1", "deps1", "code1"),
              ("base2", "lib1", "deps1", "code1")),
        "e": ("npm dependency bump", ("node1",), ("node2",)),
    }
    repo = {"e": "apps/node"}
    built = {k: {"title": t, "r1": image(*r1, repo=repo.get(k, "apps/web")),
                 "r2": image(*r2, repo=repo.get(k, "apps/web"))}
             for k, (t, r1, r2) in pairs.items() if k in wanted}
    # a run for some pairs keeps the others an earlier run described (their layers are still there)
    index = out / "pairs.json"
    earlier = json.loads(index.read_text())["pairs"] if index.exists() else {}
    doc = {"pairs": dict(sorted({**earlier, **built}.items()))}
    index.write_text(json.dumps(doc, indent=1) + "\n")
    return doc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_ROOT / "cache")
    parser.add_argument("--out", type=Path, default=DEFAULT_ROOT / "layers")
    parser.add_argument("--pairs", default="a,b,c,d,e")
    args = parser.parse_args()
    doc = build_all(args.cache, args.out, set(args.pairs.split(",")))
    for key, pair in doc["pairs"].items():
        sizes = [f"{Path(l['file']).name} {os.path.getsize(l['file']) / 1e6:.1f} MB" for l in pair["r2"]["layers"]]
        print(f"{key}: {pair['title']}: {', '.join(sizes)}")


if __name__ == "__main__":
    main()
