#!/usr/bin/env bash
# The registry tier's registries: Debian's docker-registry (distribution 2.8) run as plain processes
# with private configs and storage under $ISEP_REGISTRY_ROOT (/tmp/isep-registry), on 127.0.0.1 only,
# never as the system service, stopped by pid.
#   bash tests/registry/registry.sh install   apt-get install docker-registry apache2-utils (if missing)
#   bash tests/registry/registry.sh start     open, basic-auth, token-auth registries and a pull-through cache
#   bash tests/registry/registry.sh stop      stop them (pid files), keep nothing running
# start writes $ROOT/env.json (hosts, URLs, storage directories, the test credentials) for the fixtures
# in tests/registry/conftest.py. Ports: $ISEP_REGISTRY_PORT (15000) and the four after it.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=${ISEP_REGISTRY_ROOT:-/tmp/isep-registry}
port=${ISEP_REGISTRY_PORT:-15000}
open_port=$port auth_port=$((port + 1)) cache_port=$((port + 2)) token_port=$((port + 3)) realm_port=$((port + 4))
python=${PYTHON:-python3}

install() {
  command -v docker-registry >/dev/null && command -v htpasswd >/dev/null && command -v openssl >/dev/null \
    && command -v curl >/dev/null && return
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "registry.sh: docker-registry is missing (apt-get install docker-registry apache2-utils openssl)" >&2
    exit 3
  fi
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends \
    docker-registry apache2-utils openssl curl >/dev/null
  # the package's init script may have started the system service on :5000; this tier never uses it
  if [ -x /etc/init.d/docker-registry ]; then /etc/init.d/docker-registry stop >/dev/null 2>&1 || true; fi
}

config() {  # NAME PORT EXTRA-YAML
  mkdir -p "$root/$1/storage"
  cat > "$root/$1/config.yml" <<YAML
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $root/$1/storage
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:$2
  secret: isep-registry-tier-$1
$3
YAML
}

launch() {  # NAME COMMAND...
  local name=$1; shift
  nohup "$@" >"$root/$name/log" 2>&1 </dev/null &
  echo $! >"$root/$name/pid"
}

wait_up() {  # NAME URL
  for _ in $(seq 100); do
    if curl -s -o /dev/null "$2"; then return; fi
    kill -0 "$(cat "$root/$1/pid")" 2>/dev/null || break
    sleep 0.1
  done
  echo "registry.sh: $1 did not start; its log:" >&2
  cat "$root/$1/log" >&2
  exit 3
}

start() {
  stop >/dev/null 2>&1 || true
  rm -rf "$root"
  mkdir -p "$root/auth" "$root/realm"
  local user=isep-tester password
  password=$(head -c 18 /dev/urandom | base64 | tr -d '/+=')
  htpasswd -Bbn "$user" "$password" >"$root/auth/htpasswd"
  # the token server signs with this key; the token registry trusts its self-signed certificate
  openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=isep-test-token -keyout "$root/realm/key.pem" \
    -out "$root/realm/cert.pem" 2>/dev/null

  config open "$open_port" ""
  config auth "$auth_port" "auth:
  htpasswd:
    realm: isep-test
    path: $root/auth/htpasswd"
  config cache "$cache_port" "proxy:
  remoteurl: http://127.0.0.1:$open_port"
  config token "$token_port" "auth:
  token:
    realm: http://127.0.0.1:$realm_port/token
    service: isep-test-registry
    issuer: isep-test-issuer
    rootcertbundle: $root/realm/cert.pem"
  # the cache asks the open registry at start: start that one first
  launch open docker-registry serve "$root/open/config.yml"
  wait_up open "http://127.0.0.1:$open_port/v2/"
  for name in auth cache token; do
    launch "$name" docker-registry serve "$root/$name/config.yml"
  done
  # the password goes by the environment, not the command line (ps shows that)
  ISEP_TOKEN_PASSWORD=$password launch realm "$python" "$here/token_server.py" --port "$realm_port" \
    --key "$root/realm/key.pem" --cert "$root/realm/cert.pem" --issuer isep-test-issuer \
    --service isep-test-registry --user "$user"
  wait_up auth "http://127.0.0.1:$auth_port/v2/"
  wait_up cache "http://127.0.0.1:$cache_port/v2/"
  wait_up token "http://127.0.0.1:$token_port/v2/"
  wait_up realm "http://127.0.0.1:$realm_port/health"
  "$python" - "$root" "$user" "$password" "$open_port" "$auth_port" "$cache_port" "$token_port" "$realm_port" <<'PY'
import json, sys
root, user, password, *ports = sys.argv[1:]
names = ["open", "auth", "cache", "token", "realm"]
env = {name: {"host": f"127.0.0.1:{p}", "url": f"http://127.0.0.1:{p}", "storage": f"{root}/{name}/storage"}
       for name, p in zip(names, ports)}
for name in ("auth", "token"):
    env[name].update(username=user, password=password)
with open(f"{root}/env.json", "w") as f:
    json.dump(env, f, indent=1)
PY
  chmod 600 "$root/env.json"
  echo "registries up: $root/env.json"
}

stop() {
  [ -d "$root" ] || return 0
  for pidfile in "$root"/*/pid; do
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    rm -f "$pidfile"
  done
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 install|start|stop" >&2; exit 2 ;;
esac
