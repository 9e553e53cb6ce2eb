#!/bin/bash
# Peak RSS of every command on saves of many members (docs/formats.md, "Limits"):
#   bash bench/members.sh [COUNT...]      (default 20000 100000; run from a checkout, venv on PATH)
# Each save is the app1 sample (isep.samples, docker-oci) after COUNT empty members.
set -euo pipefail
cd "$(dirname "$0")/.."
W=$(mktemp -d "${TMPDIR:-/tmp}/isep-members.XXXXXX")
trap 'rm -rf "$W"' EXIT
python3 -c "from isep.samples import write_sample_set; from pathlib import Path; write_sample_set(Path('$W/s'), 'docker-oci', layer_kib=32)" >/dev/null
B="--base=$W/s/inspect-base.json"
m() { local label=$1; shift; /usr/bin/time -f "$label %M KiB %e s" "$@" 2>&1 >/dev/null | tail -1; }
for count in "${@:-20000 100000}"; do
  for n in $count; do
    A=$W/crowd$n.tar; O=$W/out$n; mkdir -p "$O"
    python3 -c "
from isep.samples import write_crowded_archive
with open('$A', 'wb') as out, open('$W/s/app1.tar', 'rb') as app:
    write_crowded_archive(out, app, $n)"
    echo "== $n members, $(stat -c %s "$A") bytes"
    m index sh -c "bin/isep-index $A > $O/index.json"
    m partition sh -c "bin/isep-partition $O/index.json $B > $O/plan.json"
    m pack-plan bin/isep-pack "$A" --plan "$O/plan.json" -o "$O/p"
    m pack-file bin/isep-pack "$A" "$B" -o "$O/f"
    m pack-pipe sh -c "cat $A | bin/isep-pack $B -o $O/q"
    m pack-stream sh -c "bin/isep-pack $A $B -o - > $O/s.stream"
    m verify bin/isep-verify "$O/f"
    m verify-stream sh -c "bin/isep-verify - < $O/s.stream"
    m join sh -c "bin/isep-join $O/f > $O/out.tar"
    m join-stream sh -c "bin/isep-join - < $O/s.stream > $O/out2.tar"
    cmp "$A" "$O/out.tar" && cmp "$A" "$O/out2.tar" && echo "joins: byte-exact"
    echo "documents: index $(stat -c %s "$O/index.json"), plan $(stat -c %s "$O/plan.json"), manifest $(stat -c %s "$O/f/isep-bundle.json") bytes"
    rm -rf "$O" "$A"
  done
done
