#!/usr/bin/env bash
# engines.sh - real container engines for the isep real-engine test tier.
#
# Runs on a Debian 12 (bookworm) x86_64 machine as root, without systemd and
# without network access beyond the Debian/PyPI/npm mirrors.  Self-contained:
# nothing outside this file is needed at test time.
#
# Usage: engines.sh COMMAND [ARGS] [COMMAND [ARGS]...]
#   install        apt packages from bookworm (apt-get update once) + trixie/sid
#                  debs downloaded through a PRIVATE apt config and unpacked
#                  with dpkg-deb -x (system apt sources are not touched).
#                  Idempotent.
#   start          start the three dockerd engines (idempotent), write
#                  $WORK/engines.json + $WORK/env.sh.  Exit non-zero (with the
#                  log tail) if one of them does not come up.
#   build OUTDIR   build the fixture images in every engine and podman, save
#                  the archives and inspect JSON into OUTDIR/<producer>/.
#   status         exit 0 iff all three engines answer `docker version`.
#   env            print export lines / helper functions for each engine.
#   stop           stop exactly what this script (or the test tier) started:
#                  dockerds, their containerds, a test sshd (pidfiles checked
#                  against /proc/PID/cmdline).
# Several commands may be given at once: `engines.sh install start`.
#
# Engines (private data/exec roots and sockets under $WORK/engines/<id>/):
#   legacy : bookworm docker.io 20.10 dockerd, graphdriver vfs
#   oci    : trixie   docker.io 26   dockerd, graphdriver vfs
#   cstore : sid      docker.io 28   dockerd + trixie containerd 1.7,
#            containerd image store (snapshotter "native")
#   podman : bookworm podman 4.3, --root/--runroot under $WORK/podman, vfs
#   ctr    : the trixie ctr talking to the containerd spawned by the cstore
#            dockerd ($WORK/engines/cstore/exec/containerd/containerd.sock);
#            tests import into their own namespace (isep-test), not "moby".
#
# Env: ISEP_ENGINES_WORK (default /tmp/isep-engines)
#      ISEP_DEBIAN_MIRROR  the Debian archive the trixie/sid debs come from (default: the first
#                          Debian archive in this machine's own apt sources, so that a local
#                          mirror or an apt proxy setup is followed; else http://deb.debian.org/debian)
set -euo pipefail

WORK=${ISEP_ENGINES_WORK:-/tmp/isep-engines}
OPT=$WORK/opt
ALT=$WORK/apt-alt
ENG=$WORK/engines
PODROOT=$WORK/podman
DCFG=$WORK/dockercfg
FIX=$WORK/fixture
LOGS=$WORK/logs
ENGINES="legacy oci cstore"
EPOCH=1704067200   # 2024-01-01T00:00:00Z, fixed mtime of fixture files

APT_PKGS="docker.io containerd runc tini podman skopeo umoci openssh-server openssh-client
crun conmon golang-github-containers-common uidmap iptables jq openssl tar"

log() { printf '[engines %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---------------------------------------------------------------- install
install_apt() {
  local missing=() p
  for p in $APT_PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if [ ${#missing[@]} -eq 0 ]; then log "apt: all bookworm packages present"; return; fi
  if [ ! -e "$WORK/.apt-updated" ]; then
    log "apt: update"
    apt-get -o DPkg::Lock::Timeout=600 update -qq && touch "$WORK/.apt-updated"
  fi
  log "apt: installing ${missing[*]}"
  # Without policy-rc.d the docker.io / openssh-server postinst would start a
  # system dockerd / sshd; forbid service starts for the duration of the install.
  local made_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; made_policy=1
  fi
  local rc=0
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q \
    --no-install-recommends "${missing[@]}" > "$LOGS/apt-install.log" 2>&1 || rc=$?
  if [ $rc -ne 0 ]; then
    # stale lists (mirror moved on): update once more and retry
    apt-get -o DPkg::Lock::Timeout=600 update -qq || true
    rc=0
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q \
      --no-install-recommends "${missing[@]}" >> "$LOGS/apt-install.log" 2>&1 || rc=$?
  fi
  [ $made_policy = 1 ] && rm -f /usr/sbin/policy-rc.d
  [ $rc -eq 0 ] || { tail -20 "$LOGS/apt-install.log" >&2; die "apt-get install failed"; }
}

alt_apt() { APT_CONFIG=$ALT/apt.conf apt-get -q -o APT::Sandbox::User=root "$@"; }

alt_apt_version() { # pkg suite -> candidate version in that suite
  APT_CONFIG=$ALT/apt.conf apt-cache madison "$1" 2>/dev/null \
    | awk -F'|' -v s=" $2/" '!done && index($3, s) {gsub(/ /, "", $2); print $2; done = 1}'
}

# dir:pkg/suite
ALT_SETS="docker-trixie:docker.io/trixie docker-sid:docker.io/sid docker-sid:docker-cli/sid
containerd-trixie:containerd/trixie buildx-trixie:docker-buildx/trixie"

# The URI of the first enabled `deb` source that is not a security archive, in apt's order: classic
# one-line entries (sources.list, sources.list.d/*.list) and deb822 stanzas (sources.list.d/*.sources).
apt_mirror() { # [APT_DIR (default /etc/apt)] -> URI on stdout; nothing when there is none
  local dir=${1:-/etc/apt} f files=()
  [ -f "$dir/sources.list" ] && files+=("$dir/sources.list")
  for f in "$dir"/sources.list.d/*; do
    case $f in *.list|*.sources) [ -f "$f" ] && files+=("$f") ;; esac
  done
  [ ${#files[@]} -gt 0 ] || return 0
  awk '
    function security(suites,   n, i, w) {  # every suite is a -security one
      n = split(suites, w, " ")
      for (i = 1; i <= n; i++) if (w[i] !~ /-security$/) return 0
      return n > 0
    }
    function found(u) { sub(/\/+$/, "", u); print u; done = 1; exit }
    function stanza_end() {
      if (types ~ /(^| )deb( |$)/ && enabled != "no" && uri != "" && !security(suites)) found(uri)
      types = ""; uri = ""; suites = ""; enabled = ""
    }
    FNR == 1 { if (deb822) stanza_end(); deb822 = FILENAME ~ /\.sources$/ }
    { sub(/#.*/, "") }
    !deb822 && $1 == "deb" {
      line = $0; sub(/\[[^]]*\]/, "", line); split(line, w, " ")
      if (!security(w[3])) found(w[2])
    }
    deb822 && /^[ \t]*$/ { stanza_end(); next }
    deb822 && /^[A-Za-z-]+:/ {
      key = tolower($1); $1 = ""; value = $0; sub(/^ +/, "", value)
      if (key == "types:") types = value
      else if (key == "uris:") { split(value, u, " "); uri = u[1] }
      else if (key == "suites:") suites = value
      else if (key == "enabled:") enabled = tolower(value)
    }
    END { if (deb822 && !done) stanza_end() }
  ' "${files[@]}"
}

debian_mirror() { # ISEP_DEBIAN_MIRROR, else the machine's own mirror, else deb.debian.org
  if [ -n "${ISEP_DEBIAN_MIRROR:-}" ]; then echo "${ISEP_DEBIAN_MIRROR%/}"; return; fi
  local uri; uri=$(apt_mirror /etc/apt)
  echo "${uri:-http://deb.debian.org/debian}"
}

install_alt() {
  mkdir -p "$ALT/state/lists/partial" "$ALT/cache/archives/partial" "$ALT/parts" "$OPT/debs"
  local mirror; mirror=$(debian_mirror)
  log "alt apt: trixie and sid from $mirror"
  cat > "$ALT/sources.list" <<EOF
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror trixie main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror sid main
EOF
  cat > "$ALT/apt.conf" <<EOF
Dir::Etc::SourceList "$ALT/sources.list";
Dir::Etc::SourceParts "$ALT/parts";
Dir::State "$ALT/state";
Dir::State::status "$ALT/state/status";
Dir::Cache "$ALT/cache";
APT::Get::List-Cleanup "0";
EOF
  touch "$ALT/state/status"
  local item dir spec pkg suite deb ver f
  for item in $ALT_SETS; do
    dir=${item%%:*}; spec=${item#*:}; pkg=${spec%/*}; suite=${spec#*/}
    if [ -e "$OPT/$dir/.have-$pkg" ]; then continue; fi
    if ! ls "$ALT/state/lists/"*_"${suite}"_main_binary-amd64_Packages* >/dev/null 2>&1; then
      log "alt apt: update (trixie + sid lists, private config)"; alt_apt update >/dev/null
    fi
    log "alt apt: download $spec"
    (cd "$OPT/debs" && alt_apt download "$spec" >/dev/null 2>"$LOGS/alt-download.err") || {
      alt_apt update >/dev/null; (cd "$OPT/debs" && alt_apt download "$spec" >/dev/null); }
    ver=$(alt_apt_version "$pkg" "$suite"); deb=""
    for f in "$OPT/debs/${pkg}_"*.deb; do
      [ -e "$f" ] && [ "$(dpkg-deb -f "$f" Version)" = "$ver" ] && deb=$f
    done
    [ -n "$deb" ] || die "alt apt: no downloaded .deb of $pkg $ver ($spec)"
    mkdir -p "$OPT/$dir"; dpkg-deb -x "$deb" "$OPT/$dir"
    basename "$deb" > "$OPT/$dir/.have-$pkg"
  done
  mkdir -p "$DCFG/cli-plugins"
  cp -f "$OPT/buildx-trixie/usr/libexec/docker/cli-plugins/docker-buildx" "$DCFG/cli-plugins/"
  [ -s "$DCFG/config.json" ] || echo '{}' > "$DCFG/config.json"
}

cmd_install() { install_apt; install_alt; log "install done"; }

# ---------------------------------------------------------------- engines
docker_cli() {
  if [ -x "$OPT/docker-sid/usr/bin/docker" ]; then echo "$OPT/docker-sid/usr/bin/docker"
  elif [ -x /usr/local/bin/docker ]; then echo /usr/local/bin/docker
  else echo /usr/bin/docker; fi
}
ctr_bin() {
  if [ -x "$OPT/containerd-trixie/usr/bin/ctr" ]; then echo "$OPT/containerd-trixie/usr/bin/ctr"
  else echo /usr/bin/ctr; fi
}
DOCKER=""
dk() { # ENGINE docker-args...
  local e=$1; shift
  DOCKER_HOST=unix://$ENG/$e/docker.sock DOCKER_CONFIG=$DCFG "$DOCKER" "$@"
}

engine_bin() {
  case $1 in
    legacy) echo /usr/sbin/dockerd ;;
    oci)    echo "$OPT/docker-trixie/usr/sbin/dockerd" ;;
    cstore) echo "$OPT/docker-sid/usr/sbin/dockerd" ;;
    *) die "unknown engine $1" ;;
  esac
}
engine_path() { case $1 in cstore) echo "$OPT/containerd-trixie/usr/bin" ;; *) echo "" ;; esac; }
engine_driver() { case $1 in cstore) echo native ;; *) echo vfs ;; esac; }
engine_config() {
  case $1 in
    cstore) echo '{"features": {"containerd-snapshotter": true}}' ;;
    *) echo '{}' ;;
  esac
}

pid_is_ours() { # pid dir-substring -> true if alive and its cmdline mentions our dir
  local pid=$1 d=$2
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] && kill -0 "$pid" 2>/dev/null \
    && tr '\0' ' ' < "/proc/$pid/cmdline" | grep -q -- "$d"
}

engine_alive() {
  local e=$1 pid=""
  [ -s "$ENG/$e/docker.pid" ] && pid=$(cat "$ENG/$e/docker.pid")
  pid_is_ours "$pid" "$ENG/$e/" && dk "$e" version >/dev/null 2>&1
}

start_engine() {
  local e=$1 d=$ENG/$1 bin xpath
  bin=$(engine_bin "$e"); xpath=$(engine_path "$e")
  [ -x "$bin" ] || { log "$e: $bin missing (run '$0 install')"; return 1; }
  mkdir -p "$d/data" "$d/exec"
  if engine_alive "$e"; then log "$e: already running (pid $(cat "$d/docker.pid"))"; return 0; fi
  if [ -s "$d/docker.pid" ] && pid_is_ours "$(cat "$d/docker.pid")" "$d/"; then stop_engine "$e"; fi
  rm -f "$d/docker.pid" "$d/docker.sock"
  engine_config "$e" > "$d/daemon.json"
  log "$e: starting $("$bin" --version 2>&1)"
  (
    [ -n "$xpath" ] && export PATH="$xpath:$PATH"
    exec setsid "$bin" --config-file "$d/daemon.json" \
      --data-root "$d/data" --exec-root "$d/exec" --pidfile "$d/docker.pid" \
      --host "unix://$d/docker.sock" --storage-driver "$(engine_driver "$e")" \
      --iptables=false --ip6tables=false --bridge=none \
      </dev/null >"$d/dockerd.log" 2>&1
  ) &
  local i
  for i in $(seq 1 120); do
    if dk "$e" version >/dev/null 2>&1; then log "$e: up, pid $(cat "$d/docker.pid"), socket $d/docker.sock"; return 0; fi
    sleep 0.5
  done
  log "$e: did not come up; tail of $d/dockerd.log:"; tail -20 "$d/dockerd.log" >&2 || true
  return 1
}

stop_engine() {
  local e=$1 d=$ENG/$1 pid cpid i
  pid=$( [ -s "$d/docker.pid" ] && cat "$d/docker.pid" || true)
  cpid=$( [ -s "$d/exec/containerd/containerd.pid" ] && cat "$d/exec/containerd/containerd.pid" || true)
  if pid_is_ours "$pid" "$d/"; then
    log "$e: stopping dockerd pid $pid"
    kill -TERM "$pid"
    for i in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    if kill -0 "$pid" 2>/dev/null; then log "$e: pid $pid still alive, SIGKILL"; kill -KILL "$pid"; fi
  fi
  if pid_is_ours "$cpid" "$d/"; then
    for i in $(seq 1 20); do kill -0 "$cpid" 2>/dev/null || break; sleep 0.5; done
    if pid_is_ours "$cpid" "$d/"; then log "$e: stopping leftover containerd pid $cpid"; kill -TERM "$cpid"; fi
  fi
  rm -f "$d/docker.pid"
}

stop_sshd() { # a test sshd left behind by the tier (tests normally stop it)
  local f pid
  for f in "$WORK"/sshd*/sshd.pid; do
    [ -s "$f" ] || continue
    pid=$(cat "$f")
    if pid_is_ours "$pid" "$(dirname "$f")/"; then log "sshd: stopping pid $pid"; kill -TERM "$pid"; fi
    rm -f "$f"
  done
}

write_state() {
  local cs=$ENG/cstore/exec/containerd/containerd.sock
  cat > "$WORK/engines.json" <<EOF
{
  "work": "$WORK",
  "docker": "$DOCKER",
  "docker_config": "$DCFG",
  "engines": {
    "legacy": {"host": "unix://$ENG/legacy/docker.sock", "log": "$ENG/legacy/dockerd.log"},
    "oci":    {"host": "unix://$ENG/oci/docker.sock",    "log": "$ENG/oci/dockerd.log"},
    "cstore": {"host": "unix://$ENG/cstore/docker.sock", "log": "$ENG/cstore/dockerd.log"}
  },
  "podman": ["podman", "--root", "$PODROOT/root", "--runroot", "$PODROOT/run", "--storage-driver", "vfs",
             "--cgroup-manager", "cgroupfs", "--events-backend", "none"],
  "ctr": ["$(ctr_bin)", "--address", "$cs", "--namespace", "isep-test"],
  "ctr_snapshotter": "native"
}
EOF
  cat > "$WORK/env.sh" <<EOF
# source $WORK/env.sh - clients for the engines started by engines.sh
export DOCKER_CONFIG=$DCFG            # holds the buildx CLI plugin (BuildKit)
ISEP_DOCKER=$DOCKER
dk_legacy() { DOCKER_HOST=unix://$ENG/legacy/docker.sock "\$ISEP_DOCKER" "\$@"; }  # Docker 20.10, vfs
dk_oci()    { DOCKER_HOST=unix://$ENG/oci/docker.sock    "\$ISEP_DOCKER" "\$@"; }  # Docker 26, vfs
dk_cstore() { DOCKER_HOST=unix://$ENG/cstore/docker.sock "\$ISEP_DOCKER" "\$@"; }  # Docker 28, containerd store
pm()  { podman --root $PODROOT/root --runroot $PODROOT/run --storage-driver vfs --cgroup-manager cgroupfs --events-backend none "\$@"; }
ctr_isep() { $(ctr_bin) --address $cs --namespace isep-test "\$@"; }   # e.g. ctr_isep images import --snapshotter native F.tar
EOF
}

cmd_start() {
  mkdir -p "$ENG"; DOCKER=$(docker_cli)
  local e failed=""
  for e in $ENGINES; do start_engine "$e" || failed="$failed $e"; done
  write_state
  [ -z "$failed" ] || die "engine(s) failed to start:$failed"
  podman --version >/dev/null || die "podman missing (run '$0 install')"
  mkdir -p "$PODROOT"
  log "all engines up; state in $WORK/engines.json, helpers in $WORK/env.sh"
}

cmd_status() {
  DOCKER=$(docker_cli); local e bad=0
  for e in $ENGINES; do
    if [ -d "$ENG/$e" ] && engine_alive "$e"; then
      echo "$e: running pid $(cat "$ENG/$e/docker.pid") $(dk "$e" version -f 'engine {{.Server.Version}} api {{.Server.APIVersion}}' 2>/dev/null) DOCKER_HOST=unix://$ENG/$e/docker.sock"
    else echo "$e: not running"; bad=1; fi
  done
  return $bad
}

cmd_stop() {
  local e
  stop_sshd
  for e in $ENGINES; do [ -d "$ENG/$e" ] && stop_engine "$e"; done
  log "stopped"
}

cmd_env() {
  DOCKER=$(docker_cli); write_state
  echo "# docker client: $DOCKER; BuildKit via the buildx plugin in DOCKER_CONFIG"
  echo "export DOCKER_CONFIG=$DCFG"
  local e
  for e in $ENGINES; do
    local st="not running"; [ -d "$ENG/$e" ] && engine_alive "$e" && st="running, pid $(cat "$ENG/$e/docker.pid")"
    echo "# $e [$st]:"
    echo "#   export DOCKER_HOST=unix://$ENG/$e/docker.sock"
  done
  cat "$WORK/env.sh"
}

# ---------------------------------------------------------------- fixtures
prng() { # seed bytes > stdout  (deterministic pseudo-random bytes)
  head -c "$2" < <(openssl enc -aes-128-ctr -nosalt -pbkdf2 -pass "pass:isep-$1" -in /dev/zero 2>/dev/null)
}

app_dockerfile() { # name dir cmdver
  cat <<EOF
FROM isep-test/lib:1
LABEL org.isep.layer="$1" org.isep.release="$3"
COPY app/ /opt/$2/
WORKDIR /opt/$2
CMD ["/opt/$2/run.sh"]
EOF
}

make_fixture() {
  log "fixture: generating under $FIX"
  rm -rf "$FIX"; mkdir -p "$FIX"
  local r=$FIX/rootfs-base
  mkdir -p "$r/bin" "$r/etc" "$r/usr/share/isep/base" "$r/var/empty" "$r/tmp"
  printf '#!/bin/sh\necho "isep base"\n' > "$r/bin/base.sh"; chmod 755 "$r/bin/base.sh"
  prng base 1048576 > "$r/bin/base.bin"
  printf 'NAME=isep-base\nVERSION=1\n' > "$r/etc/isep-release"
  ln -s isep-release "$r/etc/os-release"
  echo "removed by the umoci app2 layer (whiteout test)" > "$r/etc/base-remove-me.txt"
  printf 'isep test base image\n%.0s' $(seq 1 40) > "$r/usr/share/isep/base/README.txt"
  ln "$r/usr/share/isep/base/README.txt" "$r/usr/share/isep/base/README.hardlink"
  chmod 1777 "$r/tmp"

  mkdir -p "$FIX/lib/files"
  prng lib 262144 > "$FIX/lib/files/libisep.so.1"
  echo "1.0.0" > "$FIX/lib/files/VERSION"
  echo "lib_option = 1" > "$FIX/lib/lib.conf"
  cat > "$FIX/lib/Dockerfile" <<'EOF'
FROM isep-test/base:1
LABEL org.isep.layer="lib"
ENV ISEP_LIB_VERSION=1
COPY files/ /usr/lib/isep/
COPY lib.conf /etc/isep/lib.conf
EOF
  # app1 release 1
  mkdir -p "$FIX/app1/app"
  printf '#!/bin/sh\necho app1\n' > "$FIX/app1/app/run.sh"; chmod 755 "$FIX/app1/app/run.sh"
  prng app1 65536 > "$FIX/app1/app/data.bin"
  app_dockerfile app1 app1 1 > "$FIX/app1/Dockerfile"
  # app1 release 2: same base and lib, different app content
  mkdir -p "$FIX/app1-2/app"
  printf '#!/bin/sh\necho app1 release 2\n' > "$FIX/app1-2/app/run.sh"; chmod 755 "$FIX/app1-2/app/run.sh"
  prng app1-2 73728 > "$FIX/app1-2/app/data.bin"
  echo "2" > "$FIX/app1-2/app/RELEASE"
  app_dockerfile app1 app1 2 > "$FIX/app1-2/Dockerfile"
  # app2
  mkdir -p "$FIX/app2/app"
  printf '#!/bin/sh\necho app2\n' > "$FIX/app2/app/run.sh"; chmod 755 "$FIX/app2/app/run.sh"
  prng app2 131072 > "$FIX/app2/app/data.bin"
  echo "app2_option = 2" > "$FIX/app2/app2.conf"
  cat > "$FIX/app2/Dockerfile" <<'EOF'
FROM isep-test/lib:1
LABEL org.isep.layer="app2"
COPY app/ /opt/app2/
COPY app2.conf /etc/isep/app2.conf
ENTRYPOINT ["/opt/app2/run.sh"]
EOF
  find "$FIX" -exec touch -h -d "@$EPOCH" {} +
  tar --sort=name --mtime="@$EPOCH" --owner=0 --group=0 --numeric-owner \
      -C "$r" -cf "$FIX/base-rootfs.tar" .
  touch -d "@$EPOCH" "$FIX/base-rootfs.tar"
}

# image key -> build dir, reference (tag)
IMGS="base lib app1 app2 app1-2"
img_ref() { case $1 in app1-2) echo isep-test/app1:2 ;; *) echo "isep-test/$1:1" ;; esac; }

elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }'; }
timed() { # label cmd... ; appends to $TIMINGS
  local label=$1; shift; local t0 rc=0
  t0=$(date +%s.%N); "$@" || rc=$?
  printf '%s\t%s\t%s\n' "$label" "$(elapsed "$t0")" "$rc" >> "$TIMINGS"
  return $rc
}

wipe_docker() {
  local e=$1 ids
  ids=$(dk "$e" images -aq 2>/dev/null | sort -u | tr '\n' ' ')
  [ -n "${ids// /}" ] && dk "$e" rmi -f $ids >/dev/null 2>&1 || true
  dk "$e" image prune -af >/dev/null 2>&1 || true
}

build_docker() { # engine outroot
  local e=$1 out img
  out=$2/docker-$e
  log "$e: building fixture images"
  rm -rf "$out"; mkdir -p "$out"
  wipe_docker "$e"; dk "$e" builder prune -af >/dev/null 2>&1 || true
  dk "$e" import -m "isep base rootfs" -c 'ENV PATH=/bin:/usr/bin' -c 'CMD ["/bin/base.sh"]' \
     -c 'LABEL org.isep.layer=base' "$FIX/base-rootfs.tar" isep-test/base:1 > /dev/null
  for img in $IMGS; do
    [ "$img" = base ] && continue
    if [ "$e" = legacy ]; then
      DOCKER_BUILDKIT=0 timed "$e build $img" dk "$e" build -t "$(img_ref "$img")" "$FIX/$img" >> "$LOGS/build-$e.log" 2>&1 \
        || { tail -20 "$LOGS/build-$e.log" >&2; die "$e: build $img failed"; }
    else
      DOCKER_BUILDKIT=1 timed "$e build $img" dk "$e" build --progress=plain -t "$(img_ref "$img")" "$FIX/$img" >> "$LOGS/build-$e.log" 2>&1 \
        || { tail -20 "$LOGS/build-$e.log" >&2; die "$e: build $img failed"; }
    fi
  done
  for img in $IMGS; do
    timed "$e save $img" dk "$e" save -o "$out/$img.tar" "$(img_ref "$img")"
    dk "$e" inspect "$(img_ref "$img")" > "$out/inspect-$img.json"
  done
  timed "$e save app1+app2" dk "$e" save -o "$out/app1+app2.tar" isep-test/app1:1 isep-test/app2:1
  dk "$e" images --digests --no-trunc > "$out/images.txt" 2>&1 || true
  dk "$e" version > "$out/version.txt" 2>&1 || true
}

pm() { podman --root "$PODROOT/root" --runroot "$PODROOT/run" --storage-driver vfs \
         --cgroup-manager cgroupfs --events-backend none "$@"; }

build_podman() { # outroot
  local out=$1 img
  local da=$out/podman-docker-archive oa=$out/podman-oci-archive
  log "podman: building fixture images (vfs store $PODROOT)"
  rm -rf "$da" "$oa" "$PODROOT"; mkdir -p "$da" "$oa" "$PODROOT"
  pm import -q -m "isep base rootfs" -c 'ENV PATH=/bin:/usr/bin' -c 'CMD ["/bin/base.sh"]' \
     -c 'LABEL org.isep.layer=base' "$FIX/base-rootfs.tar" docker.io/isep-test/base:1 > /dev/null
  for img in $IMGS; do
    [ "$img" = base ] && continue
    timed "podman build $img" pm build --pull=never -t "docker.io/$(img_ref "$img")" "$FIX/$img" >> "$LOGS/build-podman.log" 2>&1 \
      || { tail -20 "$LOGS/build-podman.log" >&2; die "podman: build $img failed"; }
  done
  for img in $IMGS; do
    timed "podman save docker-archive $img" pm save -q --format docker-archive -o "$da/$img.tar" "docker.io/$(img_ref "$img")"
    timed "podman save oci-archive $img" pm save -q --format oci-archive -o "$oa/$img.tar" "docker.io/$(img_ref "$img")"
    pm inspect "docker.io/$(img_ref "$img")" > "$da/inspect-$img.json"
    cp "$da/inspect-$img.json" "$oa/inspect-$img.json"
  done
  # multi-image save: docker-archive only (podman 4.3 has no multi-image oci-archive)
  timed "podman save -m app1+app2" pm save -q -m --format docker-archive -o "$da/app1+app2.tar" \
    docker.io/isep-test/app1:1 docker.io/isep-test/app2:1
  pm images --digests --no-trunc > "$da/images.txt" 2>&1 || true
}

build_umoci() { # outroot: OCI layout built from rootfs dirs; app2 deletes a base file (whiteout)
  local out=$1/umoci L t img
  L=$WORK/tmp/umoci-layout; t=$WORK/tmp/umoci
  log "umoci: OCI layout from rootfs dirs (+ skopeo -> docker-archive); app2 has a whiteout"
  rm -rf "$out" "$t" "$L"; mkdir -p "$out" "$t"
  umoci init --layout "$L"
  umoci new --image "$L:base"
  umoci unpack --image "$L:base" "$t/base" >/dev/null
  cp -a "$FIX/rootfs-base/." "$t/base/rootfs/"
  umoci repack --history.created_by "COPY rootfs-base /" --image "$L:base" "$t/base"
  umoci config --image "$L:base" --config.env PATH=/bin:/usr/bin --config.cmd /bin/base.sh --config.label org.isep.layer=base
  umoci unpack --image "$L:base" "$t/lib" >/dev/null
  mkdir -p "$t/lib/rootfs/usr/lib/isep" "$t/lib/rootfs/etc/isep"
  cp -a "$FIX/lib/files/." "$t/lib/rootfs/usr/lib/isep/"; cp -a "$FIX/lib/lib.conf" "$t/lib/rootfs/etc/isep/"
  umoci repack --history.created_by "COPY lib" --image "$L:lib" "$t/lib"
  umoci config --image "$L:lib" --config.label org.isep.layer=lib --config.env ISEP_LIB_VERSION=1
  for img in app1 app2 app1-2; do
    umoci unpack --image "$L:lib" "$t/$img" >/dev/null
    mkdir -p "$t/$img/rootfs/opt/${img%-2}"; cp -a "$FIX/$img/app/." "$t/$img/rootfs/opt/${img%-2}/"
    if [ "$img" = app2 ]; then
      mkdir -p "$t/$img/rootfs/etc/isep"; cp -a "$FIX/app2/app2.conf" "$t/$img/rootfs/etc/isep/"
      rm "$t/$img/rootfs/etc/base-remove-me.txt"    # -> etc/.wh.base-remove-me.txt
    fi
    umoci repack --history.created_by "COPY $img" --image "$L:$img" "$t/$img"
    umoci config --image "$L:$img" --config.label "org.isep.layer=$img" --config.cmd "/opt/${img%-2}/run.sh"
  done
  umoci gc --layout "$L"
  for img in $IMGS; do
    skopeo copy -q "oci:$L:$img" "docker-archive:$out/$img.tar:$(img_ref "$img")"
    skopeo inspect --config --raw "oci:$L:$img" > "$out/config-$img.json"
  done
  rm -rf "$t"
}

write_versions() { # outroot
  local out=$1 e
  {
    echo "# versions (generated $(date -u +%FT%TZ) on $(uname -srm))"
    echo "docker client: $DOCKER: $("$DOCKER" --version)"
    echo "buildx plugin: $("$DCFG/cli-plugins/docker-buildx" version 2>/dev/null)"
    for e in $ENGINES; do
      echo "engine $e: $(dk "$e" version -f 'dockerd {{.Server.Version}} (API {{.Server.APIVersion}})' 2>&1)" \
           "$(dk "$e" info -f 'storage={{.Driver}}' 2>&1)"
    done
    local f; for f in "$OPT"/*/.have-*; do [ -e "$f" ] && echo "extracted: $(cat "$f")"; done
    echo "podman: $(podman --version)"; echo "skopeo: $(skopeo --version)"; echo "umoci: $(umoci --version)"
    echo "ctr: $("$(ctr_bin)" --version)"
  } > "$out/VERSIONS.txt"
}

cmd_build() {
  local out=${1:?usage: engines.sh build OUTDIR}
  mkdir -p "$out" "$WORK/tmp"; out=$(cd "$out" && pwd)
  DOCKER=$(docker_cli)
  local e
  for e in $ENGINES; do engine_alive "$e" || die "engine $e not running; run '$0 start' first"; done
  TIMINGS=$out/TIMINGS.tsv; printf 'what\tseconds\trc\n' > "$TIMINGS"
  rm -f "$LOGS"/build-*.log
  make_fixture
  cp "$FIX/base-rootfs.tar" "$out/base-rootfs.tar.input"
  # the docker engines build in parallel (2 cores; builds are I/O-light)
  local pids=() rc=0 p
  for e in $ENGINES; do build_docker "$e" "$out" & pids+=($!); done
  build_podman "$out" & pids+=($!)
  for p in "${pids[@]}"; do wait "$p" || rc=1; done
  [ $rc -eq 0 ] || die "build failed (logs in $LOGS)"
  build_umoci "$out"
  write_versions "$out"
  (cd "$out" && find . -name '*.tar' | sort | xargs sha256sum) > "$out/SHA256SUMS"
  touch "$out/.complete"
  log "build done -> $out"
}

main() {
  mkdir -p "$WORK" "$LOGS"
  [ $# -gt 0 ] || set -- --help
  while [ $# -gt 0 ]; do
    local c=$1; shift
    case $c in
      install) cmd_install ;;
      start) cmd_start ;;
      status) cmd_status ;;
      env) cmd_env ;;
      build) [ $# -gt 0 ] || die "usage: $0 build OUTDIR"; cmd_build "$1"; shift ;;
      stop) cmd_stop ;;
      -h|--help|help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; return 0 ;;
      *) die "unknown command '$c' (try --help)" ;;
    esac
  done
}
# when sourced (`. engines.sh`, as tests/test_engines_sh.py does) only define the functions
[ "${BASH_SOURCE[0]}" != "$0" ] || main "$@"
