#!/bin/sh
# Installs the edge-runtime agent as a systemd service: system user, directories, a venv under
# /opt/edge-runtime, the unit, and an example config that never replaces an existing one.
# Idempotent: a second run changes nothing and says so. Run with --help for the options.
set -eu

usage() {
    cat <<'EOF'
usage: install.sh [--prefix ROOT] [--source DIR] [--extras vision,signing] [--no-venv] [--no-enable]
       install.sh [--prefix ROOT] --uninstall

  --prefix ROOT    install under ROOT instead of / (an image being prepared); no user is created and
                   systemctl is not run there
  --source DIR     the edge-runtime source tree to pip-install (default: the tree holding this script)
  --extras LIST    pip extras, comma separated: vision (OpenCV cameras), signing (bundle signatures)
  --no-venv        skip creating the venv and the pip install
  --no-enable      do not run systemctl daemon-reload / enable --now
  --uninstall      stop and disable the service, remove the unit and /opt/edge-runtime;
                   /etc/edge-runtime and /var/lib/edge-runtime are kept
EOF
}

die() { echo "install.sh: $*" >&2; exit 2; }
say() { echo "$*"; }

here=$(cd "$(dirname "$0")" && pwd)
ROOT=/
SRC=$(dirname "$here")
EXTRAS=
VENV=1
ENABLE=1
UNINSTALL=0
while [ $# -gt 0 ]; do
    case $1 in
        --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; ROOT=$2; shift 2 ;;
        --prefix=*) ROOT=${1#*=}; shift ;;
        --source) [ $# -ge 2 ] || die "--source needs a directory"; SRC=$2; shift 2 ;;
        --source=*) SRC=${1#*=}; shift ;;
        --extras) [ $# -ge 2 ] || die "--extras needs a list"; EXTRAS=$2; shift 2 ;;
        --extras=*) EXTRAS=${1#*=}; shift ;;
        --no-venv) VENV=0; shift ;;
        --no-enable) ENABLE=0; shift ;;
        --uninstall) UNINSTALL=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option: $1" ;;
    esac
done

[ -d "$ROOT" ] || die "--prefix $ROOT: no such directory"
ROOT=$(cd "$ROOT" && pwd)
[ -d "$SRC" ] || die "--source $SRC: no such directory"
SRC=$(cd "$SRC" && pwd)
case $EXTRAS in *[!a-z0-9,_-]*) die "--extras: letters, digits and commas only, got '$EXTRAS'" ;; esac
if [ "$ROOT" = / ]; then
    R=
    [ "$(id -u)" -eq 0 ] || die "installing to / needs root (or use --prefix)"
else
    R=$ROOT
fi

USER_NAME=edge-runtime
UNIT_NAME=edge-runtime.service
ETC=$R/etc/edge-runtime
STATE=$R/var/lib/edge-runtime
OPT=$R/opt/edge-runtime
UNIT_DIR=$R/etc/systemd/system
UNIT=$UNIT_DIR/$UNIT_NAME
CHANGED=0

changed() { CHANGED=$((CHANGED + 1)); say "$*"; }

systemd_running() { [ "$ROOT" = / ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; }

# A directory: created with MODE when missing, never re-permissioned (an admin's choice stands).
ensure_dir() {
    if [ ! -d "$1" ]; then
        install -d -m "$2" "$1"
        changed "created $1"
    fi
}

# A file with exactly CONTENT from stdin: written only when it differs.
ensure_file() {
    tmp=$(mktemp)
    cat >"$tmp"
    if [ -f "$1" ] && cmp -s "$tmp" "$1"; then
        rm -f "$tmp"
        return 0
    fi
    install -m "$2" "$tmp" "$1"
    rm -f "$tmp"
    changed "wrote $1"
}

# ---------------------------------------------------------------- uninstall
if [ "$UNINSTALL" -eq 1 ]; then
    if systemd_running && [ "$ENABLE" -eq 1 ]; then
        if systemctl is-enabled --quiet "$UNIT_NAME" 2>/dev/null || systemctl is-active --quiet "$UNIT_NAME"; then
            systemctl disable --now "$UNIT_NAME"
            changed "stopped and disabled $UNIT_NAME"
        fi
    fi
    if [ -e "$UNIT" ]; then
        rm -f "$UNIT"
        changed "removed $UNIT"
        if systemd_running; then systemctl daemon-reload; fi
    fi
    if [ -e "$OPT" ]; then
        rm -rf "$OPT"
        changed "removed $OPT"
    fi
    say "kept $ETC (config, keys) and $STATE (buffer, models); remove them by hand if unwanted"
    if [ "$ROOT" = / ] && getent passwd "$USER_NAME" >/dev/null 2>&1; then
        say "kept the system user $USER_NAME (it owns $STATE); remove it with: userdel $USER_NAME"
    fi
    [ "$CHANGED" -gt 0 ] || say "nothing to remove: edge-runtime was not installed under $ROOT"
    exit 0
fi

# ---------------------------------------------------------------- install
UNIT_SRC=$SRC/devices/systemd/$UNIT_NAME
[ -f "$UNIT_SRC" ] || die "$UNIT_SRC is missing (is --source an edge-runtime tree?)"

# The system user; useradd cannot target a prefix, so an image gets a note for its first boot instead.
if [ "$ROOT" = / ]; then
    if ! getent passwd "$USER_NAME" >/dev/null 2>&1; then
        useradd --system --user-group --home-dir /var/lib/edge-runtime --no-create-home \
            --shell /usr/sbin/nologin --comment "edge-runtime agent" "$USER_NAME"
        changed "created system user $USER_NAME"
    fi
else
    say "not creating the system user under --prefix $ROOT (useradd cannot target a prefix); see $OPT/INSTALL-NOTES"
fi

ensure_dir "$R/etc" 0755
ensure_dir "$ETC" 0755
# Public keys that verify model bundles (private keys stay off devices).
ensure_dir "$ETC/keys" 0755
ensure_dir "$R/var/lib" 0755
ensure_dir "$STATE" 0750
ensure_dir "$R/opt" 0755
ensure_dir "$OPT" 0755
ensure_dir "$UNIT_DIR" 0755
if [ "$ROOT" = / ]; then
    # systemd's StateDirectory= also does this at each start; doing it now lets an admin inspect it.
    if [ "$(stat -c %U "$STATE")" != "$USER_NAME" ]; then
        chown "$USER_NAME:$USER_NAME" "$STATE"
        changed "gave $STATE to $USER_NAME"
    fi
else
    ensure_file "$OPT/INSTALL-NOTES" 0644 <<EOF
This tree was installed with --prefix, so the system user was not created.
On the target, before starting the service, run as root:
  useradd --system --user-group --home-dir /var/lib/edge-runtime --no-create-home --shell /usr/sbin/nologin $USER_NAME
  chown $USER_NAME:$USER_NAME /var/lib/edge-runtime
  chgrp $USER_NAME /etc/edge-runtime/agent.toml
  systemctl daemon-reload && systemctl enable --now $UNIT_NAME
EOF
fi

# The venv and the package; a stamp of the source files and extras makes a re-run skip pip.
if [ "$VENV" -eq 1 ]; then
    PY=${PYTHON:-python3}
    if [ ! -x "$OPT/venv/bin/python" ]; then
        "$PY" -m venv "$OPT/venv"
        changed "created venv $OPT/venv"
    fi
    stamp=$( (cd "$SRC" && find pyproject.toml edge_runtime devices -type f ! -name '*.pyc' -exec sha256sum {} + \
        | sort; echo "extras=$EXTRAS") | sha256sum | cut -d' ' -f1)
    if [ ! -f "$OPT/venv/.edge-runtime-stamp" ] || [ "$(cat "$OPT/venv/.edge-runtime-stamp")" != "$stamp" ]; then
        spec=$SRC
        [ -z "$EXTRAS" ] || spec="$SRC[$EXTRAS]"
        "$OPT/venv/bin/python" -m pip install --quiet --upgrade pip
        "$OPT/venv/bin/python" -m pip install --quiet --upgrade "$spec"
        echo "$stamp" >"$OPT/venv/.edge-runtime-stamp"
        changed "installed edge-runtime${EXTRAS:+[$EXTRAS]} from $SRC into $OPT/venv"
    fi
else
    say "skipping the venv and pip install (--no-venv)"
fi

# The unit.
unit_changed=0
if ! { [ -f "$UNIT" ] && cmp -s "$UNIT_SRC" "$UNIT"; }; then
    install -m 0644 "$UNIT_SRC" "$UNIT"
    unit_changed=1
    changed "installed $UNIT"
fi

# The config: an existing one is never touched.
CONFIG=$ETC/agent.toml
if [ -e "$CONFIG" ]; then
    say "kept the existing $CONFIG"
else
    example=$SRC/devices/agent.example.toml
    if [ -f "$example" ]; then
        install -m 0640 "$example" "$CONFIG"
        changed "installed the example config $CONFIG (from $example): edit it before starting"
    else
        install -m 0640 /dev/null "$CONFIG"
        cat >"$CONFIG" <<'EOF'
# edge-runtime agent configuration, read by: edge-runtime run --config /etc/edge-runtime/agent.toml
# Placeholder written by install.sh (no example config was found in the source tree).
# Fill in the model, source and sync settings before starting the service.
EOF
        changed "wrote a placeholder config $CONFIG: fill it in before starting"
    fi
    # Readable by the service user only (it may hold broker credentials).
    if [ "$ROOT" = / ]; then chgrp "$USER_NAME" "$CONFIG"; fi
fi

# Enable and start, only on the live system.
if [ "$ENABLE" -eq 0 ]; then
    say "not enabling the service (--no-enable)"
elif [ "$ROOT" != / ]; then
    say "not enabling the service under --prefix $ROOT"
elif ! systemd_running; then
    say "systemd is not running here: not enabling; later run: systemctl daemon-reload && systemctl enable --now $UNIT_NAME"
else
    if [ "$unit_changed" -eq 1 ]; then systemctl daemon-reload; fi
    if ! systemctl is-enabled --quiet "$UNIT_NAME" || ! systemctl is-active --quiet "$UNIT_NAME"; then
        systemctl enable --now "$UNIT_NAME"
        changed "enabled and started $UNIT_NAME"
    elif [ "$CHANGED" -gt 0 ]; then
        systemctl try-restart "$UNIT_NAME"
        say "restarted $UNIT_NAME to pick up the changes"
    fi
fi

if [ "$CHANGED" -eq 0 ]; then
    say "nothing changed: edge-runtime is already installed under $ROOT"
else
    say "done: $CHANGED change(s) under $ROOT"
fi
