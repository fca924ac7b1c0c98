#!/bin/bash
# guest-systembus.sh install|tier SRC - the second boot of the VM tier (sealbus.systembus=1),
# run as root (initrc_t) inside the guest.
#   install  early in boot, before dbus.socket: install sealbus from SRC (provision.sh's source
#            install, no tier), then make it the system bus exactly as docs/system-bus.md tells a
#            Debian administrator: sealbus-dbus.service enabled (Alias=dbus.service), the tunable
#            that lets the distribution's bus clients use it. Debian's /usr/share/dbus-1 files
#            (system.conf, system.d, system-services) are not touched.
#   tier     tests/vm/systembus_tier.py from SRC; results in $SEALBUS_RESULTS.
set -Eeuo pipefail
trap 'echo "guest-systembus.sh: FAILED at line $LINENO: $BASH_COMMAND" >&2' ERR
phase=${1:?install or tier} SRC=${2:?source tree}
OUT=${SEALBUS_RESULTS:-/var/tmp/sealbus-results}
PYTHON=/opt/sealbus/venv/bin/python
step() { echo; echo "### $* (uptime $(cut -d' ' -f1 /proc/uptime) s)"; }

case "$phase" in
install)
  step "install sealbus from the source tree (provision.sh, source install)"
  SEALBUS_OFFLINE=1 SEALBUS_INSTALL=source SEALBUS_INSTALL_ONLY=1 bash "$SRC/vagrant/provision.sh" "$SRC"
  step "sealbus becomes dbus.service (docs/system-bus.md, Debian)"
  install -m 0644 /opt/sealbus/src/packaging/sealbus-dbus.service /etc/systemd/system/sealbus-dbus.service
  restorecon -v /etc/systemd/system/sealbus-dbus.service
  setsebool -P sealbus_serve_dbus_clients 1
  systemctl enable sealbus-dbus.service
  readlink /etc/systemd/system/dbus.service
  systemctl daemon-reload
  systemctl show -p Id,Names,FragmentPath dbus.service
  step "installed"
  ;;
tier)
  mkdir -p "$OUT"
  rc=0
  (cd "$SRC" && "$PYTHON" -m tests.vm.systembus_tier --out "$OUT/tier.json") | tee "$OUT/tier.txt" || rc=$?
  cp /var/log/audit/audit.log "$OUT/audit.log" 2>/dev/null || echo "no /var/log/audit/audit.log to keep"
  exit "$rc"
  ;;
*) echo "guest-systembus.sh: unknown phase $phase" >&2; exit 2 ;;
esac
