#!/usr/bin/env bash
# By hand, not in CI: the same-run comparison of the real isula-build 0.9.6 (built and started with
# /work/shared/tools/isula-real.sh) and isep, on the bench's 1 GiB image (bench/isula-real-images.py).
#   TEMPDIRS="DIRS" bench/isula-real-compare.sh t COMMAND...   appends COMMAND's output, exit code,
#   wall time and the peak bytes under DIRS (sampled every 0.5 s) to $C/transcript.txt
# The commands run on 2026-11-29 are in bench/isula-build-2026-11-29.txt.
export ISULA_REAL_ROOT=/tmp/isula-real-gzip
S="bash /work/shared/tools/isula-real.sh"
C=${C:-/tmp/isula-cmp}
LOG=$C/transcript.txt
export PATH=/work/main/.venv/bin:$PATH
t() {  # time a command; record output, exit code, wall time, peak temp disk of DIRS
  local dirs="$TEMPDIRS"
  echo "\$ $*" >> $LOG
  local peakf=$C/peak.$$; echo 0 > $peakf
  ( while :; do s=0; for d in $dirs; do [ -e "$d" ] && s=$((s + $(du -sb "$d" 2>/dev/null | cut -f1))); done;
      [ "$s" -gt "$(cat $peakf)" ] && echo $s > $peakf; sleep 0.5; done ) & local poller=$!
  local t0=$(date +%s.%N)
  "$@" >> $LOG 2>&1; local rc=$?
  local t1=$(date +%s.%N)
  kill $poller 2>/dev/null; wait $poller 2>/dev/null
  echo "[exit $rc, wall $(echo "$t1 - $t0" | bc) s, peak temp $(cat $peakf) bytes]" >> $LOG
  rm -f $peakf
}
"$@"
