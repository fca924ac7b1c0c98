#!/bin/sh
# Idempotent: gather real dbus-daemon system.d policy files for the differential
# corpus test (tests/test_policy_corpus.py) into /var/cache/sealbus/policy-corpus/.
# Daemon packages are only downloaded and unpacked (apt-get download + dpkg-deb -x),
# never installed; the files already installed on this machine (systemd, polkit, ...)
# are copied too. Does nothing when the cache holds files and its stamp is newer
# than this script (--check only tells, by its exit status, whether it would fetch).
# A package that cannot be fetched is skipped with a message.
set -u
cd "$(dirname "$0")/.."
script="$(pwd)/scripts/policy-corpus.sh"

DEST=${SEALBUS_POLICY_CORPUS:-/var/cache/sealbus/policy-corpus}
STAMP="$DEST/.stamp"
PKGS="avahi-daemon bluez udisks2 network-manager upower accountsservice modemmanager wpasupplicant"

if [ -f "$STAMP" ] && [ "$STAMP" -nt "$script" ] && ls "$DEST"/*.conf >/dev/null 2>&1; then
    exit 0
fi
[ "${1:-}" = --check ] && exit 1  # --check: exit 0 when the corpus is there and fresh, 1 when this would fetch it
echo "policy-corpus: fetching the dbus policy files of $(echo $PKGS | wc -w) daemon packages (downloaded, not installed)" >&2
mkdir -p "$DEST" || exit 1

copy_confs() {  # copy_confs ROOT: every system.d *.conf below ROOT
    for d in "$1/usr/share/dbus-1/system.d" "$1/etc/dbus-1/system.d"; do
        [ -d "$d" ] || continue
        for f in "$d"/*.conf; do
            [ -f "$f" ] && cp -f "$f" "$DEST/"
        done
    done
    return 0
}

tmp=$(mktemp -d /tmp/sealbus-policy-corpus.XXXXXX) || exit 1
trap 'rm -rf "$tmp"' EXIT INT TERM
chmod 755 "$tmp"  # apt-get download runs as _apt where it can
SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
updated=no
for p in $PKGS; do
    if ! (cd "$tmp" && apt-get download -qq "$p" >/dev/null 2>&1); then
        if [ "$updated" = no ]; then
            updated=yes
            $SUDO apt-get update -qq >/dev/null 2>&1 || echo "policy-corpus: apt-get update failed" >&2
        fi
        if ! (cd "$tmp" && apt-get download -qq "$p" >/dev/null 2>&1); then
            echo "policy-corpus: cannot download $p; skipped" >&2
            continue
        fi
    fi
    for deb in "$tmp"/"$p"_*.deb; do
        [ -f "$deb" ] || continue
        mkdir -p "$tmp/x-$p"
        if dpkg-deb -x "$deb" "$tmp/x-$p"; then
            copy_confs "$tmp/x-$p"
        else
            echo "policy-corpus: cannot unpack $deb; skipped" >&2
        fi
    done
done
copy_confs ""  # what this machine already has (systemd, polkit, ...)
chmod 644 "$DEST"/*.conf 2>/dev/null

n=$(ls "$DEST"/*.conf 2>/dev/null | wc -l)
if [ "$n" -eq 0 ]; then
    echo "policy-corpus: no policy files gathered in $DEST" >&2
    exit 1
fi
touch "$STAMP"
echo "policy-corpus: $n files in $DEST" >&2
