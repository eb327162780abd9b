#!/usr/bin/env bash
# Install, update or remove the edge inspection daemon on a line PC. Safe to run again.
#
#   sudo deploy/install.sh --station station3              # install/update + config for station3
#   sudo deploy/install.sh --model /media/usb/pkg-1.4.0    # copy, have running stations load it, then activate
#   sudo deploy/install.sh --rollback                      # back to the previous model
#   sudo deploy/install.sh --uninstall [--purge]           # remove (keeps config + state unless --purge)
#
# --prefix ROOT puts every path under ROOT (a staging tree, or a temporary root in tests); the
# user, ownership and systemctl steps then only happen when ROOT is /. See deploy/README.md.
set -euo pipefail

readonly SERVICE_USER=edge-inspect
readonly UNIT_NAME=edge-inspect@.service
readonly UI_UNIT_NAME=edge-ui@.service
# Station names become unit instance names, MQTT topic levels and file names: keep them plain.
readonly STATION_RE='^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$'

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROOT=/
ACTION=install
PURGE=0
SYSTEMD=1
VENV=1
WITH_UI=0
WHEEL_DIR=
PYTHON=python3
MODEL_SRC=
CONFIG_TEMPLATE=
STATIONS=()
STATION_PIDS=()               # NAME=PID: stations not run by systemd that must confirm a model switch
RELOAD_TIMEOUT=120

usage() {
    cat <<'EOF'
Usage: install.sh [options]
  (no action)            install or update: user, directories, venv, unit, configs
  --model DIR            copy the model package DIR into the store; every running station loads
                         it (SIGHUP) and only when all confirm does it become `current`
  --rollback             make the previous model `current` again, confirmed the same way
                         (a second rollback undoes it)
  --uninstall            remove the unit and /opt/edge-inspect; keeps /etc/edge-inspect and
                         /var/lib/edge-inspect (configs, outboxes, evidence, models)
  --purge                with --uninstall: also remove configs, state, models and the user

  --station NAME         create /etc/edge-inspect/NAME.yaml if missing and enable
                         edge-inspect@NAME.service (repeatable)
  --prefix ROOT          install under ROOT instead of / (no useradd/chown/systemctl)
  --no-systemd           do not call systemctl (image builds, chroots)
  --no-venv              do not create/update the virtual environment
  --with-ui              also the station page: the venv gets the `ui` extra and each --station
                         also enables edge-ui@NAME.service (docs/station-page.md)
  --wheel-dir DIR        offline install: pip --no-index --find-links DIR
  --python PY            interpreter for the venv (default python3, needs >= 3.10)
  --config-template F    station config template (default configs/edge/example.yaml)
  --station-pid NAME=PID with --model/--rollback: also confirm with this station daemon, which is
                         not run by systemd (SIGHUP to PID; state in /var/lib/edge-inspect/NAME)
  --reload-timeout S     seconds to wait for each station to report the load (default 120)
  -h, --help             this text
EOF
}

say() { printf 'install.sh: %s\n' "$*"; }
die() { printf 'install.sh: error: %s\n' "$*" >&2; exit 1; }

while [[ $# -gt 0 ]]; do
    case $1 in
        --model) [[ $# -ge 2 ]] || die "--model needs a package folder"; ACTION=model; MODEL_SRC=$2; shift ;;
        --rollback) ACTION=rollback ;;
        --uninstall) ACTION=uninstall ;;
        --purge) PURGE=1 ;;
        --station-pid) [[ $# -ge 2 && $2 =~ ^[^=]+=[0-9]+$ ]] || die "--station-pid needs NAME=PID"
            STATION_PIDS+=("$2"); shift ;;
        --reload-timeout) [[ $# -ge 2 && $2 =~ ^[0-9]+$ ]] || die "--reload-timeout needs seconds"
            RELOAD_TIMEOUT=$2; shift ;;
        --station) [[ $# -ge 2 ]] || die "--station needs a name"; STATIONS+=("$2"); shift ;;
        --prefix) [[ $# -ge 2 ]] || die "--prefix needs a folder"; ROOT=$2; shift ;;
        --no-systemd) SYSTEMD=0 ;;
        --no-venv) VENV=0 ;;
        --with-ui) WITH_UI=1 ;;
        --wheel-dir) [[ $# -ge 2 ]] || die "--wheel-dir needs a folder"; WHEEL_DIR=$2; shift ;;
        --python) [[ $# -ge 2 ]] || die "--python needs an interpreter"; PYTHON=$2; shift ;;
        --config-template) [[ $# -ge 2 ]] || die "--config-template needs a file"; CONFIG_TEMPLATE=$2; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option: $1" ;;
    esac
    shift
done

[[ $ROOT == /* ]] || die "--prefix must be an absolute path, got '$ROOT'"
ROOT=${ROOT%/}                # "" for /, so "$ROOT/etc" is /etc
LIVE=0                        # 1: the real system (ownership, users, systemctl)
if [[ -z $ROOT ]]; then
    LIVE=1
    [[ $EUID -eq 0 ]] || die "run as root (or use --prefix for a staging tree)"
else
    SYSTEMD=0
fi
[[ $PURGE -eq 0 || $ACTION == uninstall ]] || die "--purge only goes with --uninstall"
[[ ${#STATIONS[@]} -eq 0 || $ACTION == install ]] || die "--station goes with an install, not with --$ACTION"
[[ ${#STATION_PIDS[@]} -eq 0 || $ACTION == model || $ACTION == rollback ]] \
    || die "--station-pid goes with --model or --rollback"
for s in "${STATIONS[@]}"; do
    [[ $s =~ $STATION_RE ]] || die "station name '$s': use letters, digits, '-' and '_' (max 64)"
    [[ $s != models ]] || die "station name 'models' is reserved for the model store"
done

# Paths as the daemon sees them (inside configs and the unit) and as this script writes them.
readonly OPT=/opt/edge-inspect ETC=/etc/edge-inspect STATE=/var/lib/edge-inspect
readonly MODELS=$STATE/models
readonly UNIT_DIR=/etc/systemd/system
CONFIG_TEMPLATE=${CONFIG_TEMPLATE:-$REPO/configs/edge/example.yaml}

# chown only on the live system: in a prefix the service user does not exist.
own() { if [[ $LIVE -eq 1 ]]; then chown "$@"; fi; }
mkdir_mode() {  # mode owner:group path
    mkdir -p "$ROOT$3"
    chmod "$1" "$ROOT$3"
    own "$2" "$ROOT$3"
}
run_systemctl() { if [[ $SYSTEMD -eq 1 ]]; then systemctl "$@"; fi; }

# Serialise concurrent runs (two operators, or a model push during an update).
lock() {
    mkdir -p "$ROOT$STATE"
    exec 9>"$ROOT$STATE/.install.lock"
    if command -v flock >/dev/null; then
        flock -w 60 9 || die "another install.sh is running (lock $ROOT$STATE/.install.lock)"
    fi
}

# --- install ------------------------------------------------------------------------------

create_user() {
    [[ $LIVE -eq 1 ]] || return 0
    getent group video >/dev/null || groupadd --system video
    getent group "$SERVICE_USER" >/dev/null || groupadd --system "$SERVICE_USER"
    if ! id "$SERVICE_USER" >/dev/null 2>&1; then
        useradd --system --gid "$SERVICE_USER" --groups video --no-create-home \
            --home-dir /nonexistent --shell /usr/sbin/nologin \
            --comment "edge defect inspection daemon" "$SERVICE_USER"
        say "created system user $SERVICE_USER"
    else
        usermod --append --groups video "$SERVICE_USER"
    fi
}

create_dirs() {
    mkdir_mode 0755 root:root "$OPT"
    mkdir_mode 0755 root:root "$OPT/share"
    mkdir_mode 0750 "root:$SERVICE_USER" "$ETC"
    create_model_store
    mkdir -p "$ROOT$UNIT_DIR"
}

# /var/lib/edge-inspect/models/{versions/<name>-<version>-<hash8>/, current, previous}:
# readable by the daemon, written by root only (the unit also mounts it read-only).
create_model_store() {
    mkdir_mode 0755 root:root "$STATE"
    mkdir_mode 0750 "root:$SERVICE_USER" "$MODELS"
    mkdir_mode 0750 "root:$SERVICE_USER" "$MODELS/versions"
}

install_venv() {
    [[ $VENV -eq 1 ]] || { say "skipping the virtual environment (--no-venv)"; return 0; }
    local venv=$ROOT$OPT/venv pip_args=(--disable-pip-version-check --no-input --quiet)
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
        || die "$PYTHON is older than 3.10 (use --python)"
    [[ -x $venv/bin/python ]] || "$PYTHON" -m venv "$venv"
    if [[ -n $WHEEL_DIR ]]; then
        pip_args+=(--no-index --find-links "$WHEEL_DIR")
    fi
    # The plain project install is the edge runtime only: no [train] extra, so no torch.
    if [[ $WITH_UI -eq 1 ]]; then
        "$venv/bin/python" -m pip install "${pip_args[@]}" "${REPO}[ui]"
    else
        "$venv/bin/python" -m pip install "${pip_args[@]}" "$REPO"
    fi
    "$venv/bin/python" - <<'EOF' || die "the venv is not a clean edge install (see above)"
import importlib.util, sys
import edge  # noqa: F401  (the package itself must import)
if importlib.util.find_spec("torch") is not None:
    sys.exit("torch is installed in the edge venv; the edge runtime must not depend on it")
EOF
    say "virtual environment ready: $OPT/venv"
}

install_unit() {
    install -m 0644 "$REPO/deploy/$UNIT_NAME" "$ROOT$UNIT_DIR/$UNIT_NAME"
    install -m 0644 "$REPO/deploy/$UI_UNIT_NAME" "$ROOT$UNIT_DIR/$UI_UNIT_NAME"  # enabled only --with-ui
    install -m 0644 "$REPO/deploy/README.md" "$ROOT$OPT/share/README.md"
    run_systemctl daemon-reload
}

# <section>.port of each given config (stations on one PC each need their own ports).
section_port() {  # section config...
    local section=$1
    shift
    awk -v want="$section" '/^[A-Za-z_][A-Za-z0-9_]*:/ { section = $0; sub(/:.*/, "", section) }
         section == want && /^[ \t]+port:/ { print $2 }' "$@"
}
metrics_ports() { section_port metrics "$@"; }

# A metrics port for a new station: the template's, or one above the highest already taken.
next_metrics_port() {  # template existing-config...
    local template_port=$1 highest
    shift
    if [[ $# -eq 0 || $template_port == 0 ]]; then echo "$template_port"; return; fi  # 0 = any free port
    highest=$(metrics_ports "$@" | sort -n | tail -n 1)
    if [[ $highest =~ ^[0-9]+$ ]]; then echo $((highest + 1)); else echo "$template_port"; fi
}

# Copy the template with station.name, model.path, state_dir and metrics.port set for this
# station (and a folder source's path moved into the state dir: the sandbox makes every
# other path read-only).
# Comments survive; a password_file/password_env value is commented out because the unit
# hands the password over as the systemd credential `mqtt-password`.
render_config() {  # template station metrics-port ui-port > config
    awk -v station="$2" -v model="$MODELS/current" -v state="$STATE/$2" -v port="$3" -v uiport="$4" '
        function set(line, value,   c) {  # keep the key, its indent and a trailing comment
            c = index(line, " #"); match(line, /^[ \t]*[A-Za-z_]+:/)
            return substr(line, 1, RLENGTH) " " value (c ? "  " substr(line, c + 1) : "")
        }
        /^[A-Za-z_][A-Za-z0-9_]*:/ { section = $0; sub(/:.*/, "", section) }
        section == "station" && /^[ \t]+name:/ { print set($0, station); named = 1; next }
        section == "model" && /^[ \t]+path:/ { print set($0, model); modeled = 1; next }
        /^state_dir:/ { print set($0, state); stated = 1; next }
        section == "metrics" && /^[ \t]+port:/ { print set($0, port); next }
        section == "ui" && /^[ \t]+port:/ { print set($0, uiport); next }
        section == "source" && /^[ \t]+type:/ { source_type = $2 }
        section == "source" && source_type == "folder" && /^[ \t]+path:/ { print set($0, state "/incoming"); next }
        section == "mqtt" && /^[ \t]+password_(file|env):/ && !/:[ \t]*(null|~)?[ \t]*(#.*)?$/ {
            print "#" $0 "  # install.sh: the password comes from the mqtt-password credential"; next }
        { print }
        END {
            if (!stated) print "state_dir: " state
            if (!named) { print "template has no station.name" > "/dev/stderr"; exit 3 }
            if (!modeled) { print "template has no model.path" > "/dev/stderr"; exit 3 }
        }' "$1"
}

install_station() {
    local name=$1 cfg=$ETC/$1.yaml pw=$ETC/$1.mqtt-password tmp port others template_port ui_port
    mkdir_mode 0750 "$SERVICE_USER:$SERVICE_USER" "$STATE/$name"
    if [[ -e $ROOT$cfg ]]; then
        say "keeping existing $cfg"
    else
        [[ -f $CONFIG_TEMPLATE ]] || die "config template $CONFIG_TEMPLATE not found (use --config-template)"
        others=("$ROOT$ETC"/*.yaml)
        [[ -e ${others[0]} ]] || others=()
        template_port=$(metrics_ports "$CONFIG_TEMPLATE")
        port=$(next_metrics_port "$template_port" "${others[@]}")
        # the station page's port moves with the metrics port (8088 beside 9108, 8089 beside 9109, ...)
        ui_port=$(section_port ui "$CONFIG_TEMPLATE")
        if [[ ${ui_port:-0} != 0 && ${template_port:-0} != 0 ]]; then
            ui_port=$((ui_port + ${port:-9108} - template_port))
        fi
        tmp=$(mktemp "$ROOT$ETC/.$name.yaml.XXXXXX")
        render_config "$CONFIG_TEMPLATE" "$name" "${port:-9108}" "${ui_port:-0}" >"$tmp" \
            || { rm -f "$tmp"; die "cannot render $cfg from $CONFIG_TEMPLATE"; }
        mv -T "$tmp" "$ROOT$cfg"
        say "wrote $cfg from $(basename "$CONFIG_TEMPLATE"): set station.line, source and mqtt.* for this station"
    fi
    if grep -qF "$STATE/$name/incoming" "$ROOT$cfg"; then
        mkdir_mode 0750 "$SERVICE_USER:$SERVICE_USER" "$STATE/$name/incoming"
    fi
    chmod 0640 "$ROOT$cfg"
    own "root:$SERVICE_USER" "$ROOT$cfg"
    if [[ -e $ROOT$pw ]]; then
        chmod 0600 "$ROOT$pw"
        own root:root "$ROOT$pw"
    else
        say "no $pw yet: the unit will not start without it (one line, mode 0600, owner root)"
    fi
    run_systemctl enable "edge-inspect@$name.service"
    if [[ $WITH_UI -eq 1 ]]; then
        run_systemctl enable "edge-ui@$name.service"
    fi
}

do_install() {
    lock
    create_user
    create_dirs
    install_venv
    install_unit
    local s
    for s in "${STATIONS[@]}"; do install_station "$s"; done
    [[ -L $ROOT$MODELS/current ]] || say "no model is active yet: install.sh --model PACKAGE_DIR"
    say "installed under ${ROOT:-/}; start with: systemctl start edge-inspect@<station>"
}

# --- models -------------------------------------------------------------------------------

# Print "<name>-<version>-<hash8>" of a package after checking every file against the
# SHA-256 list in its package.json (stdlib only, so it works before the venv exists).
package_id() {
    "$PYTHON" - "$1" <<'EOF'
import hashlib, json, re, sys
from pathlib import Path

root = Path(sys.argv[1])
try:
    meta = json.loads((root / "package.json").read_text(encoding="utf-8"))
    name, version, files = meta["name"], meta["version"], meta["files"]
except (OSError, ValueError, KeyError, TypeError) as e:
    sys.exit(f"{root}/package.json: not a model package ({type(e).__name__}: {e})")
if "model.xml" not in files or "model.bin" not in files:
    sys.exit(f"{root}/package.json: 'files' must list model.xml and model.bin")
for rel, expected in files.items():
    path = root / rel
    if Path(rel).is_absolute() or ".." in Path(rel).parts:
        sys.exit(f"{root}/package.json: file name {rel!r} must be a relative path inside the package")
    if not str(path.resolve()).startswith(str(root.resolve()) + "/"):
        sys.exit(f"{path}: resolves outside the package (a symlink must not leave the package)")
    if not path.is_file():
        sys.exit(f"{path}: listed in package.json but missing")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if h.hexdigest() != expected:
        sys.exit(f"{path}: SHA-256 mismatch (corrupted or replaced file)")
for what, value in (("name", name), ("version", version)):
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", str(value)):
        sys.exit(f"{root}/package.json: {what} {value!r} is not usable in a folder name")
print(f"{name}-{version}-{files['model.bin'][:8]}")
EOF
}

# Atomically point $MODELS/<link> at <target>: a reader sees the old or the new link, never none.
switch_link() {  # link target
    local tmp=$ROOT$MODELS/.$1.tmp.$$
    ln -sfn "$2" "$tmp"
    mv -Tf "$tmp" "$ROOT$MODELS/$1"
}

# Running stations as "NAME<TAB>unit:<unit>" or "NAME<TAB>pid:<pid>".
running_stations() {
    local spec unit name
    for spec in "${STATION_PIDS[@]}"; do printf '%s\tpid:%s\n' "${spec%%=*}" "${spec#*=}"; done
    [[ $SYSTEMD -eq 1 ]] || return 0
    while read -r unit _; do
        [[ -n $unit ]] || continue
        name=${unit#edge-inspect@}
        printf '%s\tunit:%s\n' "${name%.service}" "$unit"
    done < <(systemctl list-units --type=service --state=active --plain --no-legend 'edge-inspect@*.service')
}

REQUESTS=()
remove_requests() { if [[ ${#REQUESTS[@]} -gt 0 ]]; then rm -f "${REQUESTS[@]}"; fi; }
trap remove_requests EXIT

# Have every running station load versions/<id> BEFORE `current` points at it. If one refuses
# or does not answer, the stations that did load it are asked to load the old target again
# (`current` has not moved, so nothing else needs undoing). Returns 1 after saying why.
confirm_stations() {  # target (versions/<id>) old-target (may be empty)
    local target=$1 old=$2 line stations=() back=()
    mapfile -t stations < <(running_stations)
    if [[ ${#stations[@]} -eq 0 ]]; then
        say "no running station to confirm ${target#versions/} with; stations load it at their next start"
        return 0
    fi
    ask_stations "$target" "${stations[@]}" && return 0
    for line in "${stations[@]}"; do
        if [[ " ${CONFIRMED[*]} " == *" ${line%%$'\t'*} "* ]]; then back+=("$line"); fi
    done
    if [[ -n $old && ${#back[@]} -gt 0 ]]; then
        say "rolling back the stations that loaded ${target#versions/} to ${old#versions/}"
        ask_stations "$old" "${back[@]}" || say "warning: rollback incomplete; restart those stations"
    fi
    return 1
}

# Write <state>/model-request.json, SIGHUP, then wait for <state>/loaded-model.json
# (edge/lifecycle/model_state.py) to report that request. Sets CONFIRMED to the stations that loaded it.
CONFIRMED=()
ask_stations() {  # target station-line...
    local target=$1 req_id line name how state stations=("${@:2}") rc=0
    CONFIRMED=()
    req_id="install-$$-$(date +%s%N)"
    for line in "${stations[@]}"; do
        name=${line%%$'\t'*} how=${line#*$'\t'}
        state=$ROOT$STATE/$name
        [[ -d $state ]] || { say "error: station $name: no state dir $state"; rc=1; continue; }
        REQUESTS+=("$state/model-request.json")
        "$PYTHON" - "$state/model-request.json" "$req_id" "$ROOT$MODELS/$target" <<'EOF'
import json, os, sys
out, req_id, path = sys.argv[1:]
with open(out + ".tmp", "w") as f:
    json.dump({"id": req_id, "path": path}, f)
os.replace(out + ".tmp", out)
EOF
        say "asking $name to load ${target#versions/}"
        case $how in
            unit:*) systemctl reload "${how#unit:}" || { say "error: reload of ${how#unit:} failed"; rc=1; } ;;
            pid:*) kill -HUP "${how#pid:}" || { say "error: station $name: no process ${how#pid:}"; rc=1; } ;;
        esac
    done
    for line in "${stations[@]}"; do
        name=${line%%$'\t'*}
        [[ -d $ROOT$STATE/$name ]] || continue
        "$PYTHON" - "$ROOT$STATE/$name/loaded-model.json" "$req_id" "${target##*-}" "$RELOAD_TIMEOUT" "$name" \
            <<'EOF' && CONFIRMED+=("$name") || rc=1
import json, sys, time
path, req_id, hash8, timeout, name = sys.argv[1:]
deadline = time.monotonic() + float(timeout)
while time.monotonic() < deadline:
    try:
        with open(path) as f:
            state = json.load(f)
    except (OSError, ValueError):
        state = {}
    if state.get("request") == req_id:
        if state.get("ok") and str(state.get("sha256") or "").startswith(hash8):
            print(f"install.sh: station {name} loaded {state.get('name')} {state.get('version')}")
            sys.exit(0)
        sys.exit(f"install.sh: error: station {name} did not load the model: {state.get('error')}")
    time.sleep(0.2)
sys.exit(f"install.sh: error: station {name} did not report within {timeout} s ({path})")
EOF
    done
    remove_requests
    return $rc
}

do_model() {
    [[ -d $MODEL_SRC ]] || die "--model $MODEL_SRC: not a folder"
    if [[ $LIVE -eq 1 ]] && ! getent group "$SERVICE_USER" >/dev/null; then
        die "group $SERVICE_USER does not exist: run install.sh (without --model) first"
    fi
    lock
    create_model_store
    local id dest tmp old
    id=$(package_id "$MODEL_SRC") || die "refusing $MODEL_SRC (see above)"
    dest=$MODELS/versions/$id
    if [[ -d $ROOT$dest ]]; then
        package_id "$ROOT$dest" >/dev/null || die "$dest exists but does not verify; remove it and retry"
        say "model $id already in the store"
    else
        # Copy beside the store and rename into place, so a half-copied version never exists.
        tmp=$(mktemp -d "$ROOT$MODELS/versions/.incoming.XXXXXX")
        cp -R "$MODEL_SRC/." "$tmp/"
        find "$tmp" -type d -exec chmod 0750 {} +
        find "$tmp" -type f -exec chmod 0640 {} +
        own -R "root:$SERVICE_USER" "$tmp"
        package_id "$tmp" >/dev/null || { rm -rf "$tmp"; die "copy of $MODEL_SRC does not verify"; }
        mv -T "$tmp" "$ROOT$dest"
        say "stored model $id"
    fi
    old=$(readlink "$ROOT$MODELS/current" 2>/dev/null || true)
    if [[ $old == "versions/$id" ]]; then
        say "model $id is already current"
        return 0
    fi
    confirm_stations "versions/$id" "$old" \
        || die "model $id not activated: \`current\` stays ${old:-unset}; stations keep the model they run"
    if [[ -n $old ]]; then switch_link previous "$old"; fi
    switch_link current "versions/$id"
    say "current model: $id${old:+ (previous: ${old#versions/})}"
}

do_rollback() {
    lock
    local cur prev
    prev=$(readlink "$ROOT$MODELS/previous" 2>/dev/null) || die "no previous model to roll back to"
    cur=$(readlink "$ROOT$MODELS/current" 2>/dev/null) || die "no current model"
    [[ -d $ROOT$MODELS/$prev ]] || die "previous model $prev is missing from the store"
    confirm_stations "$prev" "$cur" || die "rollback to ${prev#versions/} not done: \`current\` stays ${cur#versions/}"
    # current first: if interrupted between the two renames the station already runs the
    # rollback target, and `previous` still names it.
    switch_link current "$prev"
    switch_link previous "$cur"
    say "current model: ${prev#versions/} (rolled back from ${cur#versions/})"
}

# --- uninstall ----------------------------------------------------------------------------

do_uninstall() {
    local unit
    if [[ $SYSTEMD -eq 1 ]]; then
        while read -r unit _; do
            [[ -n $unit ]] || continue
            systemctl disable --now "$unit" || true
        done < <(systemctl list-units --all --type=service --plain --no-legend 'edge-inspect@*.service' 'edge-ui@*.service')
    fi
    # Instances enabled but not loaded still have their wants links.
    rm -f "$ROOT$UNIT_DIR"/*.wants/edge-inspect@*.service "$ROOT$UNIT_DIR"/*.wants/edge-ui@*.service
    rm -f "$ROOT$UNIT_DIR/$UNIT_NAME" "$ROOT$UNIT_DIR/$UI_UNIT_NAME"
    rm -rf "$ROOT$OPT"
    run_systemctl daemon-reload
    if [[ $PURGE -eq 1 ]]; then
        rm -rf "$ROOT$ETC" "$ROOT$STATE"
        if [[ $LIVE -eq 1 ]] && id "$SERVICE_USER" >/dev/null 2>&1; then
            userdel "$SERVICE_USER"
            if getent group "$SERVICE_USER" >/dev/null; then groupdel "$SERVICE_USER"; fi
        fi
        say "removed everything, including configs, outboxes, evidence and models"
    else
        rm -f "$ROOT$STATE/.install.lock"
        say "removed; kept $ETC and $STATE (configs, outboxes, evidence, models): --purge removes them"
    fi
}

case $ACTION in
    install) do_install ;;
    model) do_model ;;
    rollback) do_rollback ;;
    uninstall) do_uninstall ;;
esac
