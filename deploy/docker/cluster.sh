#!/usr/bin/env bash
# Build the CPU image without an image registry and run a 3-node cluster from it on loopback.
#
#   deploy/docker/cluster.sh base     a Debian bookworm base image made with debootstrap + docker import
#   deploy/docker/cluster.sh wheels   fill deploy/docker/wheels/ on the host (pip download)
#   deploy/docker/cluster.sh image    base + wheels + docker build of deploy/docker/Dockerfile.cpu
#   deploy/docker/cluster.sh up       alice, bob, carol: --network host, listening on 127.0.0.1
#   deploy/docker/cluster.sh check    /healthz, /readyz and /metrics on all three, every node sees the
#                                     other two, echo prompts through alice's HTTP API served by each
#                                     node, Docker's HEALTHCHECK healthy on all three
#   deploy/docker/cluster.sh down     remove the containers and their data
#   deploy/docker/cluster.sh test     image, up, check, down (down also on failure)
#
# `make image` and `make cluster-test` run it (not part of `make test`: it needs root or the docker
# group, dockerd running, debootstrap, and a Debian mirror; about 10 minutes the first time).
# Environment: TORCH_PIN (from the Makefile), DEBIAN_MIRROR, IMAGE, BASE_IMAGE, BUILD_DIR,
# P2P_PORT (alice's libp2p port; bob +1, carol +2), HTTP_PORT (likewise).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
TORCH_PIN=${TORCH_PIN:-$(sed -n 's/^TORCH_PIN *:= *//p' Makefile)}
TORCH_VERSION=${TORCH_PIN#torch==}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
BASE_IMAGE=${BASE_IMAGE:-accelmesh/debian:bookworm}
IMAGE=${IMAGE:-accelmesh:cpu}
BUILD_DIR=${BUILD_DIR:-$ROOT/build/docker}
WHEELS=$ROOT/deploy/docker/wheels
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
P2P_PORT=${P2P_PORT:-24001}
HTTP_PORT=${HTTP_PORT:-28401}
NODES=(alice bob carol)
NICE=(nice -n 19 ionice -c3)

say() { printf 'cluster.sh: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }
need() { command -v "$1" >/dev/null || die "$1 not found: $2"; }

docker_ok() {
  need docker "apt-get install docker.io"
  docker info >/dev/null 2>&1 || die "cannot talk to dockerd (start it: 'dockerd &' or 'systemctl start docker'; run as root or in the docker group)"
}

cmd_base() {
  docker_ok
  if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then say "$BASE_IMAGE exists"; return; fi
  need debootstrap "apt-get install debootstrap"
  [ "$(id -u)" = 0 ] || die "debootstrap needs root"
  local rootfs=$BUILD_DIR/rootfs
  rm -rf "$rootfs"
  mkdir -p "$BUILD_DIR"
  say "debootstrap bookworm (minbase) from $DEBIAN_MIRROR into $rootfs"
  "${NICE[@]}" debootstrap --variant=minbase bookworm "$rootfs" "$DEBIAN_MIRROR" >"$BUILD_DIR/debootstrap.log" 2>&1 \
    || { tail -20 "$BUILD_DIR/debootstrap.log" >&2; die "debootstrap failed (log: $BUILD_DIR/debootstrap.log)"; }
  # the same apt sources as the official debian:bookworm image: updates and security updates too
  cat >"$rootfs/etc/apt/sources.list" <<EOF
deb $DEBIAN_MIRROR bookworm main
deb $DEBIAN_MIRROR bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
EOF
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc/* \
    "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
  say "docker import -> $BASE_IMAGE"
  tar -C "$rootfs" -c . | docker import -c 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
  rm -rf "$rootfs"
}

cmd_wheels() {
  [ -x "$PYTHON" ] || die "$PYTHON missing: run 'make venv' first"
  say "pip download into $WHEELS: $TORCH_PIN (CPU build) and .[hf,embed] with their dependencies"
  # torch's CPU wheel: from pip's configured find-links / indexes if it is there, else the CPU index
  "${NICE[@]}" "$PYTHON" -m pip download -q --no-deps --no-index -d "$WHEELS" "$TORCH_PIN" 2>/dev/null \
    || "${NICE[@]}" "$PYTHON" -m pip download -q --no-deps -d "$WHEELS" --index-url "$TORCH_INDEX_URL" "$TORCH_PIN"
  local constraints=$BUILD_DIR/torch-cpu.txt
  mkdir -p "$BUILD_DIR"
  echo "torch==$TORCH_VERSION+cpu" >"$constraints"  # never PyPI's CUDA build
  "${NICE[@]}" "$PYTHON" -m pip download -q -d "$WHEELS" --find-links "$WHEELS" -c "$constraints" \
    ".[hf,embed]" "setuptools>=68" wheel
  say "$(find "$WHEELS" -maxdepth 1 -type f ! -name '*.md' ! -name .gitignore | wc -l) files, $(du -sh "$WHEELS" | cut -f1)"
}

cmd_image() {
  cmd_base
  cmd_wheels
  local builder=()
  docker buildx version >/dev/null 2>&1 || builder=(env DOCKER_BUILDKIT=0)  # Debian's docker.io: no buildx
  say "docker build $IMAGE from deploy/docker/Dockerfile.cpu (BASE_IMAGE=$BASE_IMAGE, WHEELHOUSE_ONLY=1)"
  local start=$SECONDS
  "${NICE[@]}" "${builder[@]}" docker build -f deploy/docker/Dockerfile.cpu -t "$IMAGE" \
    --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "TORCH_VERSION=$TORCH_VERSION" --build-arg WHEELHOUSE_ONLY=1 .
  say "built $IMAGE in $((SECONDS - start)) s: $(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}')"
}

container() { echo "accelmesh-$1"; }

node_index() { local i; for i in "${!NODES[@]}"; do if [ "${NODES[$i]}" = "$1" ]; then echo "$i"; fi; done; }

daemon_json() { docker exec "$(container "$1")" cat /var/lib/accelmesh/daemon.json 2>/dev/null; }

json_field() { "$PYTHON" -c "import json, sys; print(json.load(sys.stdin)$1)"; }

wait_for_daemon_json() {
  local node=$1 deadline=$((SECONDS + 60))
  until daemon_json "$node" >/dev/null; do
    [ "$(docker inspect -f '{{.State.Running}}' "$(container "$node")")" = true ] \
      || { docker logs "$(container "$node")" >&2; die "$node exited"; }
    [ $SECONDS -lt $deadline ] || { docker logs "$(container "$node")" >&2; die "$node wrote no daemon.json in 60 s"; }
    sleep 0.5
  done
}

start_node() {
  local node=$1; shift
  local i; i=$(node_index "$node")
  docker run -d --name "$(container "$node")" --network host \
    -v "$BUILD_DIR/cluster/$node:/var/lib/accelmesh" \
    -v "$BUILD_DIR/cluster/swarm.key:/run/secrets/cluster_key:ro" \
    "$IMAGE" daemon --listen "/ip4/127.0.0.1/tcp/$((P2P_PORT + i))" --http "127.0.0.1:$((HTTP_PORT + i))" \
    --cluster-key /run/secrets/cluster_key --log-level info "$@" >/dev/null
  wait_for_daemon_json "$node"
}

cmd_up() {
  docker_ok
  docker image inspect "$IMAGE" >/dev/null 2>&1 || die "no image $IMAGE: run '$0 image' first"
  cmd_down 2>/dev/null || true
  local dir=$BUILD_DIR/cluster
  mkdir -p "$dir"
  # data dirs owned by the image's user (uid 10001), made without root on the host
  docker run --rm --user 0 --entrypoint /bin/sh -v "$dir:/c" "$IMAGE" -c \
    'install -d -o 10001 -g 10001 -m 0700 /c/alice /c/bob /c/carol && chown 10001:10001 /c'
  docker run --rm -v "$dir:/c" "$IMAGE" keygen --cluster-key /c/swarm.key >/dev/null
  say "alice: libp2p 127.0.0.1:$P2P_PORT, HTTP 127.0.0.1:$HTTP_PORT"
  start_node alice
  local alice_addr
  alice_addr=$(daemon_json alice | json_field '["multiaddrs"][0]')
  say "bob, carol: --bootstrap $alice_addr"
  start_node bob --bootstrap "$alice_addr"
  start_node carol --bootstrap "$alice_addr"
}

http() { curl -fsS --max-time 10 "$@"; }

peer_ids_seen_by() { docker exec "$(container "$1")" accelmesh peers --json | "$PYTHON" -c \
  'import json, sys; print(" ".join(sorted(p["peer_id"] for p in json.load(sys.stdin)["peers"])))'; }

cmd_check() {
  docker_ok
  need curl "apt-get install curl"
  local node i ids=() url
  for i in "${!NODES[@]}"; do
    node=${NODES[$i]}
    url="http://127.0.0.1:$((HTTP_PORT + i))"
    ids[i]=$(daemon_json "$node" | json_field '["peer_id"]')
    printf '%-6s %s  healthz=%s readyz=%s\n' "$node" "${ids[i]}" "$(http "$url/healthz")" "$(http "$url/readyz")"
    http "$url/metrics" | grep -q '^accelmesh_build_info{' || die "$node: /metrics has no accelmesh_build_info"
  done
  # every node sees the other two (adverts over gossipsub; bob and carol only dialed alice)
  local deadline=$((SECONDS + 60)) want seen ok
  while :; do
    ok=1
    for i in "${!NODES[@]}"; do
      want=$(for j in "${!NODES[@]}"; do [ "$j" = "$i" ] || echo "${ids[j]}"; done | sort | xargs)
      seen=$(peer_ids_seen_by "${NODES[$i]}")
      [ "$seen" = "$want" ] || ok=0
    done
    [ $ok = 1 ] && break
    [ $SECONDS -lt $deadline ] || die "peers do not see each other after 60 s"
    sleep 1
  done
  for i in "${!NODES[@]}"; do echo "${NODES[$i]} sees: $(peer_ids_seen_by "${NODES[$i]}")"; done
  # an echo prompt through alice's HTTP API, served by each node in turn
  local body served
  for i in "${!NODES[@]}"; do
    body=$(http "http://127.0.0.1:$HTTP_PORT/v1/chat/completions" -H 'content-type: application/json' \
      -H "x-accelmesh-on-peers: ${ids[i]}" \
      -d "{\"model\": \"echo\", \"messages\": [{\"role\": \"user\", \"content\": \"hello from the cluster test $i\"}]}")
    served=$(echo "$body" | json_field '["accelmesh"]["peer"]')
    echo "alice's HTTP API -> $(echo "$body" | json_field '["choices"][0]["message"]["content"]') (served by ${NODES[$i]}: $served)"
    [ "$served" = "${ids[i]}" ] || die "the prompt for ${NODES[$i]} was served by $served"
  done
  # Docker's HEALTHCHECK (first probe after its 30 s interval)
  deadline=$((SECONDS + 120))
  for node in "${NODES[@]}"; do
    until [ "$(docker inspect -f '{{.State.Health.Status}}' "$(container "$node")")" = healthy ]; do
      [ $SECONDS -lt $deadline ] || die "$node: HEALTHCHECK is $(docker inspect -f '{{.State.Health.Status}}' "$(container "$node")")"
      sleep 2
    done
    echo "$node: HEALTHCHECK healthy"
  done
  say "cluster OK"
}

cmd_down() {
  local node
  for node in "${NODES[@]}"; do docker rm -f "$(container "$node")" >/dev/null 2>&1 || true; done
  if [ -d "$BUILD_DIR/cluster" ]; then
    docker run --rm --user 0 --entrypoint /bin/sh -v "$BUILD_DIR/cluster:/c" "$IMAGE" -c 'rm -rf /c/*' 2>/dev/null || true
    rm -rf "$BUILD_DIR/cluster" 2>/dev/null || true
  fi
}

on_exit() {
  local status=$? node
  if [ "$status" != 0 ]; then
    for node in "${NODES[@]}"; do say "--- $node's log"; docker logs --tail 30 "$(container "$node")" 2>&1 || true; done
  fi
  cmd_down
}

cmd_test() {
  cmd_image
  trap on_exit EXIT
  cmd_up
  cmd_check
}

case "${1:-}" in
  base|wheels|image|up|check|down|test) "cmd_$1" ;;
  *) sed -n '2,16p' "$0" >&2; exit 2 ;;
esac
