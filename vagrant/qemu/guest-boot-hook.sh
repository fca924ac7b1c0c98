#!/bin/sh
# Installed in the guest as /usr/local/sbin/sealbus-vm-hook, labelled
# initrc_exec_t so systemd runs it in initrc_t (unconfined on Debian), which may
# load policy modules and runcon into the demo domains.
# Mounts the 9p share "host" and runs the in-guest script found there:
# guest-run.sh SHARE [PHASE] (PHASE: tier, the default, or systembus-install).
mkdir -p /mnt/host
if ! mountpoint -q /mnt/host && ! mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 host /mnt/host; then
  echo "sealbus-vm-hook: cannot mount 9p share 'host'" >&2
  exit 1
fi
/bin/bash /mnt/host/guest-run.sh /mnt/host "${1:-tier}"
rc=$?
sync
umount /mnt/host
exit $rc
