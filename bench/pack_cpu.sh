#!/bin/bash
# CPU seconds of isep-pack against its primitive (zstd -3, threads=-1, from the page cache), on the
# same archive, alternating: on a shared 2-core machine wall times follow other agents' load, CPU
# seconds much less (bench/RESULTS.md, issue #12 item 4).
#   bench/pack_cpu.sh WORKDIR RUNS REPO...
# WORKDIR: a `bench.py --keep` work dir (archive.tar, archive-base.json, archive-lib.json); each REPO
# is a checkout whose bin/isep-pack runs. Prints "label wall user sys minor-faults" per run, then
# medians and CPU-s per GiB.
set -euo pipefail
work=$1 runs=$2
shift 2
python=${PYTHON:-python}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
cat > "$out/prim.py" <<'EOF'
import mmap, sys, zstandard
buf = memoryview(mmap.mmap(-1, 1 << 20))
with open(sys.argv[1], "rb") as f, open(sys.argv[2], "wb") as dest:
    with zstandard.ZstdCompressor(level=3, threads=-1).stream_writer(dest, closefd=False) as w:
        while n := f.readinto(buf):
            w.write(buf[:n])
EOF
cat "$work/archive.tar" > /dev/null
for _ in $(seq "$runs"); do
  for repo in "$@"; do
    rm -rf "$out/parts"
    cat "$work/archive.tar" | /usr/bin/time -f "$repo %e %U %S %R" "$python" "$repo/bin/isep-pack" \
      --base "$work/archive-base.json" --lib "$work/archive-lib.json" -o "$out/parts" 2>&1 >/dev/null | tail -1
  done
  /usr/bin/time -f "primitive %e %U %S %R" "$python" "$out/prim.py" "$work/archive.tar" "$out/prim.zst" 2>&1 | tail -1
done | tee "$out/runs"
"$python" - "$out/runs" "$(stat -c %s "$work/archive.tar")" <<'EOF'
import statistics, sys
runs: dict = {}
for line in open(sys.argv[1]):
    label, *values = line.split()
    runs.setdefault(label, []).append([float(v) for v in values])
gib = (1 << 30) / int(sys.argv[2])
for label, rows in runs.items():
    cpu = statistics.median(user + sys_ for _, user, sys_, _ in rows)
    print(f"{label}: wall {statistics.median(r[0] for r in rows):.2f} s, user+sys {cpu:.3f} s = "
          f"{cpu * gib:.2f} CPU-s/GiB, {statistics.median(r[3] for r in rows):.0f} minor faults")
EOF
