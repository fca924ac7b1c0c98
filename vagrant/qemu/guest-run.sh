#!/bin/bash
# guest-run.sh SHARE [PHASE] - runs INSIDE the qemu guest at boot (initrc_t, from the
# boot hook). SHARE/project is the project tree.
#   first boot (the enforcing tier): PHASE tier; results in SHARE/results.
#   second boot (kernel option sealbus.systembus=1, sealbus is the machine's system bus):
#     PHASE systembus-install (early, before dbus.socket: guest-systembus.sh install) and
#     PHASE tier (tests/vm/systembus_tier.py); results in SHARE/results-systembus.
SHARE=${1:-/mnt/host}
PHASE=${2:-tier}
systembus=0
grep -qw 'sealbus.systembus=1' /proc/cmdline && systembus=1
OUT=$SHARE/results
[ "$systembus" = 1 ] && OUT=$SHARE/results-systembus
mkdir -p "$OUT"
# shellcheck disable=SC1091
[ -f "$SHARE/vm-env" ] && . "$SHARE/vm-env"
if [ "$PHASE" = systembus-install ]; then
  [ "$systembus" = 1 ] || { echo "guest-run.sh: systembus-install without sealbus.systembus=1" >&2; exit 1; }
  bash "$SHARE/project/vagrant/qemu/guest-systembus.sh" install "$SHARE/project" > "$OUT/install.log" 2>&1
  rc=$?
  echo "guest-run.sh: systembus install exit $rc (uptime $(cut -d' ' -f1 /proc/uptime) s)" | tee -a "$OUT/install.log" >&2
  sync
  exit $rc
fi
{
  echo "uptime at start: $(cut -d' ' -f1 /proc/uptime) s; $(uname -r); context $(id -Z)"
  echo "network interfaces (expect only lo): $(ls /sys/class/net | tr '\n' ' ')"
  if [ "$systembus" = 1 ]; then
    SEALBUS_RESULTS=/var/tmp/sealbus-results bash "$SHARE/project/vagrant/qemu/guest-systembus.sh" tier /opt/sealbus/src
  else
    SEALBUS_OFFLINE=1 SEALBUS_RESULTS=/var/tmp/sealbus-results bash "$SHARE/project/vagrant/provision.sh" "$SHARE/project"
  fi
  rc=$?
  cp -r /var/tmp/sealbus-results/. "$OUT/" 2>/dev/null
  journalctl -b --no-pager > "$OUT/journal.txt" 2>&1
  echo "uptime at end: $(cut -d' ' -f1 /proc/uptime) s"
  echo "TIER_EXIT=$rc"
} > "$OUT/guest.log" 2>&1
echo "guest-run.sh: done ($(tail -1 "$OUT/guest.log"))" >&2
sync
