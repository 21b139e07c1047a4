#!/bin/sh
# SPDX-License-Identifier: Apache-2.0
# Sets a Kubernetes node up for the sandboxer from inside the sandboxer-node DaemonSet pod
# (sandboxer-node.yaml), with the node's root filesystem mounted at $HOST_ROOT:
#   1. the sandboxer binary to /usr/local/bin (and the shim-name link containerd looks for),
#   2. its systemd unit and, unless one is there, its default config,
#   3. `sandboxer install containerd` on the node's containerd config (idempotent),
#   4. on the node (through its PID 1's namespaces): reload systemd, start the sandboxer, and
#      restart containerd only if its config changed.
# Then it sleeps, so the pod stays Running; deleting the DaemonSet leaves the node as it is.
#
# Environment: HOST_ROOT (default /host); SANDBOXER_BIN (default /usr/bin/sandboxer);
# SANDBOXER_SHARE, where the unit and config come from (default: the package layout in the
# image); SANDBOXER_NODE_SYSTEMD=0 skips step 4 (tests); SANDBOXER_NODE_ONESHOT=1 exits after.
set -eu

HOST_ROOT="${HOST_ROOT:-/host}"
BIN="${SANDBOXER_BIN:-/usr/bin/sandboxer}"
UNIT_SRC="${SANDBOXER_SHARE:+$SANDBOXER_SHARE/sandboxer.service}"
UNIT_SRC="${UNIT_SRC:-/lib/systemd/system/sandboxer.service}"
CONFIG_SRC="${SANDBOXER_SHARE:+$SANDBOXER_SHARE/sandboxer.toml}"
CONFIG_SRC="${CONFIG_SRC:-/etc/sandboxer/config.toml}"

log() { echo "sandboxer-node: $*" >&2; }

[ -d "$HOST_ROOT/etc" ] || { log "$HOST_ROOT is not the node's root filesystem"; exit 1; }
"$BIN" --version >&2

# 1. The binary, replaced whole (a running daemon keeps its old inode).
mkdir -p "$HOST_ROOT/usr/local/bin"
cp "$BIN" "$HOST_ROOT/usr/local/bin/.sandboxer.new"
chmod 0755 "$HOST_ROOT/usr/local/bin/.sandboxer.new"
mv -f "$HOST_ROOT/usr/local/bin/.sandboxer.new" "$HOST_ROOT/usr/local/bin/sandboxer"
ln -sf sandboxer "$HOST_ROOT/usr/local/bin/containerd-shim-sandboxer-v1"

# 2. The unit (pointing at that binary) and the config, which is the operator's once there.
mkdir -p "$HOST_ROOT/etc/systemd/system" "$HOST_ROOT/etc/sandboxer"
sed -e 's|^ExecStart=[^ ]*/sandboxer |ExecStart=/usr/local/bin/sandboxer |' "$UNIT_SRC" \
    >"$HOST_ROOT/etc/systemd/system/sandboxer.service"
if [ ! -e "$HOST_ROOT/etc/sandboxer/config.toml" ]; then
    cp "$CONFIG_SRC" "$HOST_ROOT/etc/sandboxer/config.toml"
fi

# 3. containerd's config.
said="$("$BIN" install containerd --config "$HOST_ROOT/etc/containerd/config.toml" 2>&1)" || {
    log "$said"
    exit 1
}
log "$said"

# 4. The node's systemd.
if [ "${SANDBOXER_NODE_SYSTEMD:-1}" = 1 ]; then
    on_node() { nsenter --target 1 --mount --uts --ipc --net --pid -- "$@"; }
    on_node systemctl daemon-reload
    on_node systemctl enable sandboxer.service
    on_node systemctl restart sandboxer.service
    case "$said" in
        *"already registers"*) ;;
        *) log "restarting containerd"; on_node systemctl restart containerd.service ;;
    esac
fi
log "node ready"

[ "${SANDBOXER_NODE_ONESHOT:-0}" = 1 ] && exit 0
while :; do sleep 3600; done
