"""Registry pull/push speed and peak RSS: HTTP client candidates beside curl, on the same blob of the
registry tier's open registry (start it first: bash tests/registry/registry.sh start).

    python bench/registry_bench.py --size 200M --runs 3            # pull candidates + isep push/fetch
    python bench/registry_bench.py --size 1G --only isep           # the flat-memory check

Each candidate runs in a child process (peak RSS from wait4, its own); MB/s from the median wall.
urllib3, requests and httpx are imported only if installed (a scratch venv: --python)."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each child gets: URL of the blob (GET), and prints nothing; it reads the body to the end in 1 MiB
# blocks and throws it away, as a download to /dev/null does.
PULLERS = {
    "http.client": """
import http.client, sys
from urllib.parse import urlsplit
u = urlsplit(sys.argv[1]); c = http.client.HTTPConnection(u.netloc)
c.request("GET", u.path); r = c.getresponse(); assert r.status == 200, r.status
b = bytearray(1 << 20)
while r.readinto(b): pass
""",
    "urllib3": """
import sys, urllib3
r = urllib3.PoolManager().request("GET", sys.argv[1], preload_content=False); assert r.status == 200
for _ in r.stream(1 << 20): pass
""",
    "requests": """
import sys, requests
r = requests.get(sys.argv[1], stream=True); assert r.status_code == 200
for _ in r.iter_content(1 << 20): pass
""",
    "httpx": """
import sys, httpx
with httpx.stream("GET", sys.argv[1]) as r:
    assert r.status_code == 200
    for _ in r.iter_bytes(1 << 20): pass
""",
}

ISEP_FETCH = """
import os, sys
from isep.registry import RegistryClient
host, repo, digest, size, dest = sys.argv[1:6]
with RegistryClient(host) as c:
    c.fetch_blob(repo, digest, int(size), dest)
os.remove(dest)
"""

ISEP_PUSH = """
import sys
from isep.registry import RegistryClient
host, repo, digest, size, path = sys.argv[1:6]
with RegistryClient(host) as c:
    assert c.push_blob(repo, digest, int(size), path) == "uploaded"
"""

CURL_PUSH = r"""
set -e
loc=$(curl -sf -X POST -D - -o /dev/null "$1/v2/$2/blobs/uploads/" | tr -d '\r' | sed -n 's/^Location: //Ip')
case "$loc" in http*) ;; *) loc="$1$loc" ;; esac
curl -sf -X PUT -H 'Content-Type: application/octet-stream' -T "$4" -o /dev/null "$loc&digest=$3"
"""


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB) of one child, RSS from GNU time: wait4 from this process would
    count the RSS of the forked copy of this interpreter before its exec."""
    with tempfile.NamedTemporaryFile("r") as rss:
        start = time.perf_counter()
        status = subprocess.run(["/usr/bin/time", "-o", rss.name, "-f", "%M", *argv], env=env).returncode
        wall = time.perf_counter() - start
        if status:
            raise SystemExit(f"{argv[:3]} failed: {status}")
        return wall, int(rss.read().split()[-1])


def measure(name: str, argv_for_run, runs: int, size: int, env: dict[str, str], results: dict) -> None:
    walls, rss = [], []
    for i in range(runs):
        wall, peak = timed(argv_for_run(i), env)
        walls.append(wall)
        rss.append(peak)
    median = statistics.median(walls)
    results[name] = {"walls": walls, "mb_s": size / median / 1e6, "peak_rss_kib": max(rss)}
    print(f"{name:28s} {size / median / 1e6:8.1f} MB/s  median {median:6.2f} s  peak RSS "
          f"{max(rss) / 1024:6.1f} MiB  walls {', '.join(f'{w:.2f}' for w in walls)}", flush=True)


def make_blob(path: str, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            block = os.urandom(min(left, 1 << 20))
            f.write(block)
            digest.update(block)
            left -= len(block)
    return "sha256:" + digest.hexdigest()


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="200M")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--env", default="/tmp/isep-registry/env.json")
    parser.add_argument("--python", default=sys.executable, help="interpreter for the candidates")
    parser.add_argument("--only", default="", help="comma list: curl,http.client,urllib3,requests,httpx,isep")
    parser.add_argument("--workdir", default=tempfile.gettempdir())
    parser.add_argument("--out")
    opts = parser.parse_args()
    registry = json.load(open(opts.env))["open"]
    size = parse_size(opts.size)
    only = set(filter(None, opts.only.split(",")))
    env = dict(os.environ, PYTHONPATH=ROOT)
    work = tempfile.mkdtemp(prefix="isep-registry-bench-", dir=opts.workdir)
    blob = os.path.join(work, "blob")
    digest = make_blob(blob, size)
    tag = f"{os.getpid()}-{int(time.time())}"
    results: dict = {"size": size, "digest": digest}
    py = opts.python

    def wanted(name: str) -> bool:
        return not only or name in only or name.split(" ")[0] in only

    # push: a new repository each run, so that the registry stores the whole blob each time
    if wanted("curl"):
        measure("curl push (monolithic PUT)", lambda i: ["bash", "-c", CURL_PUSH, "-", registry["url"],
                f"bench/curl-{tag}-{i}", digest, blob], opts.runs, size, env, results)
    if wanted("isep"):
        measure("isep push_blob (128 MiB PATCHes)", lambda i: [sys.executable, "-c", ISEP_PUSH, registry["host"],
                f"bench/isep-{tag}-{i}", digest, str(size), blob], opts.runs, size, env, results)
    if not results.get("curl push (monolithic PUT)") and not results.get("isep push_blob (128 MiB PATCHes)"):
        subprocess.run([sys.executable, "-c", ISEP_PUSH, registry["host"], f"bench/isep-{tag}-0", digest,
                        str(size), blob], env=env, check=True)
    url = f"{registry['url']}/v2/bench/isep-{tag}-0/blobs/{digest}"
    if wanted("curl") and not results.get("isep push_blob (128 MiB PATCHes)"):
        url = f"{registry['url']}/v2/bench/curl-{tag}-0/blobs/{digest}"

    if wanted("curl"):
        measure("curl -o /dev/null", lambda i: ["curl", "-sf", "-o", "/dev/null", url], opts.runs, size, env, results)
    if wanted("curl"):
        out = os.path.join(work, "curl-out")
        measure("curl | tee file | sha256sum", lambda i: ["bash", "-c", f"curl -sf '{url}' | tee {out} | sha256sum "
                f"| grep -q {digest[7:]} && rm {out}"], opts.runs, size, env, results)
    for name, code in PULLERS.items():
        if wanted(name):
            measure(f"{name} to /dev/null", lambda i, code=code: [py, "-c", code, url], opts.runs, size, env, results)
    if wanted("isep"):
        repo = url.split("/v2/", 1)[1].split("/blobs/")[0]
        measure("isep fetch_blob (file+sha256)", lambda i: [sys.executable, "-c", ISEP_FETCH, registry["host"], repo,
                digest, str(size), os.path.join(work, "fetched")], opts.runs, size, env, results)
    os.remove(blob)
    os.rmdir(work)
    if opts.out:
        with open(opts.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
