#!/bin/bash
# guest-run.sh SHARE - runs INSIDE the qemu guest at boot (initrc_t, from the
# boot hook). SHARE/project is the project tree; results go to SHARE/results.
SHARE=${1:-/mnt/host}
OUT=$SHARE/results
mkdir -p "$OUT"
# shellcheck disable=SC1091
[ -f "$SHARE/vm-env" ] && . "$SHARE/vm-env"
{
  echo "uptime at start: $(cut -d' ' -f1 /proc/uptime) s; $(uname -r); context $(id -Z)"
  echo "network interfaces (expect only lo): $(ls /sys/class/net | tr '\n' ' ')"
  SEALBUS_OFFLINE=1 SEALBUS_RESULTS=/var/tmp/sealbus-results bash "$SHARE/project/vagrant/provision.sh" "$SHARE/project"
  rc=$?
  cp -r /var/tmp/sealbus-results/. "$OUT/" 2>/dev/null
  journalctl -b --no-pager > "$OUT/journal.txt" 2>&1
  echo "uptime at end: $(cut -d' ' -f1 /proc/uptime) s"
  echo "TIER_EXIT=$rc"
} > "$OUT/guest.log" 2>&1
echo "guest-run.sh: done ($(tail -1 "$OUT/guest.log"))" >&2
sync
