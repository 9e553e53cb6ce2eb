#!/bin/bash
# CPU seconds of isep-pack against its primitive (issue #12's: sha256 + zstd -3, threads=-1, from the
# page cache into a new file), on the same archive, alternating: on this shared 2-core machine wall
# times drift by 10-40 % between runs, CPU seconds much less (bench/RESULTS.md, issue #12 item 4).
#   bench/pack_cpu.sh WORKDIR RUNS REPO...
# WORKDIR: a `bench.py --keep` work dir (archive.tar, archive-base.json, archive-lib.json); each REPO
# is a checkout whose bin/isep-pack runs. Each run of a REPO is the whole pipeline the bench times,
# `cat archive.tar | isep-pack ...`: its CPU seconds are cat's and pack's together.
# Prints "label wall user sys minor-faults" per run, then medians, CPU-s per GiB and the bound: the
# best ratio to the primitive pack could reach if all its CPU seconds ran on every core at once,
#   bound = primitive wall x cores / pipeline CPU seconds.
set -euo pipefail
work=$1 runs=$2
shift 2
python=${PYTHON:-python}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
cat > "$out/prim.py" <<'EOF'
import hashlib, mmap, os, sys, zstandard
buf = memoryview(mmap.mmap(-1, 1 << 20))
sha = hashlib.sha256()
with open(sys.argv[1], "rb") as f, open(sys.argv[2], "wb") as dest:
    with zstandard.ZstdCompressor(level=3, threads=-1).stream_writer(dest, closefd=False) as w:
        while n := f.readinto(buf):
            sha.update(buf[:n])
            w.write(buf[:n])
os.unlink(sys.argv[2])  # its pages are dropped, never written back (as bench.py's primitive)
EOF
cat "$work/archive.tar" > /dev/null
for _ in $(seq "$runs"); do
  for repo in "$@"; do
    rm -rf "$out/parts"
    sync
    /usr/bin/time -f "$repo %e %U %S %R" sh -c "cat '$work/archive.tar' | '$python' '$repo/bin/isep-pack' \
      --base '$work/archive-base.json' --lib '$work/archive-lib.json' -o '$out/parts' -q" 2>&1 | tail -1
  done
  sync
  /usr/bin/time -f "primitive %e %U %S %R" "$python" "$out/prim.py" "$work/archive.tar" "$out/prim.zst" 2>&1 | tail -1
done | tee "$out/runs"
"$python" - "$out/runs" "$(stat -c %s "$work/archive.tar")" "$(nproc)" <<'EOF'
import statistics, sys
runs: dict = {}
for line in open(sys.argv[1]):
    label, *values = line.split()
    runs.setdefault(label, []).append([float(v) for v in values])
gib, cores = (1 << 30) / int(sys.argv[2]), int(sys.argv[3])
prim_wall = statistics.median(r[0] for r in runs.get("primitive", [[0]]))
for label, rows in runs.items():
    cpu = statistics.median(user + sys_ for _, user, sys_, _ in rows)
    wall = statistics.median(r[0] for r in rows)
    line = (f"{label}: wall {wall:.2f} s, user+sys {cpu:.3f} s = {cpu * gib:.2f} CPU-s/GiB, "
            f"{statistics.median(r[3] for r in rows):.0f} minor faults")
    if label != "primitive" and prim_wall:
        line += f"; ratio {prim_wall / wall:.3f}, bound on {cores} cores {prim_wall * cores / cpu:.3f}"
    print(line)
EOF
