#!/bin/bash
# run-vm-test.sh - the enforcing SELinux tier in a qemu guest (make vm-test).
# Builds (or reuses) the cached image, boots it with SELinux enforcing and no
# network device, shares the project over 9p, and fails unless every case of
# the in-guest tier passed (XFAIL allowed, reported).
#   WORK=/var/tmp/sealbus-vm (image cache), TIMEOUT=540 (qemu), SMP=2, ACCEL=auto|kvm|tcg
#   SEALBUS_VM_DIAG=1: diagnose in the guest: dontaudit rules off (semodule -DB),
#   so denials the policy hides (e.g. nsswitch domains reading selinuxfs) reach audit.log
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
TOP=$(cd "$HERE/../.." && pwd)
export WORK=${WORK:-/var/tmp/sealbus-vm}
SHARE=$WORK/share
TIMEOUT=${TIMEOUT:-540}
SMP=${SMP:-2}
ACCEL=${ACCEL:-auto}
# /dev/kvm on these machines may be PVM (kvm_pvm), which stock guest kernels
# cannot use: KVM only when a hardware KVM module is loaded, else TCG.
if [ "$ACCEL" = auto ]; then
  if [ -w /dev/kvm ] && { [ -d /sys/module/kvm_intel ] || [ -d /sys/module/kvm_amd ]; }; then ACCEL=kvm; else ACCEL=tcg; fi
fi
case "$ACCEL" in
  kvm) ACC=(-enable-kvm -cpu host) ;;
  tcg) ACC=(-accel tcg,thread=multi -cpu max) ;;
  *) echo "ACCEL must be kvm, tcg or auto" >&2; exit 2 ;;
esac

t0=$(date +%s)
"$HERE/build-image.sh"
t1=$(date +%s)

rm -rf "$SHARE"; mkdir -p "$SHARE/project" "$SHARE/results"
install -m 0755 "$HERE/guest-run.sh" "$SHARE/guest-run.sh"
# settings for the guest (sourced by guest-run.sh)
{ [ -n "${SEALBUS_VM_DIAG:-}" ] && echo "export SEALBUS_VM_DIAG=$SEALBUS_VM_DIAG"; true; } > "$SHARE/vm-env"
tar -C "$TOP" --exclude=.venv --exclude=.git --exclude='__pycache__' --exclude=.hypothesis \
    --exclude=.pytest_cache --exclude=.ruff_cache -cf - . | tar -C "$SHARE/project" -xf -

echo "== vm-test: accel=$ACCEL smp=$SMP (image ready in $((t1 - t0)) s)"
set +e
timeout "$TIMEOUT" qemu-system-x86_64 "${ACC[@]}" -smp "$SMP" -m 2048 \
  -nographic -nic none -no-reboot -snapshot \
  -kernel "$WORK/vmlinuz" -initrd "$WORK/initrd.img" \
  -append "root=/dev/vda rw console=ttyS0 quiet security=selinux selinux=1 enforcing=1" \
  -drive file="$WORK/rootfs.img",format=raw,if=virtio \
  -virtfs local,path="$SHARE",mount_tag=host,security_model=none,id=host \
  </dev/null > "$WORK/console.log" 2>&1
qrc=$?
set -e
t2=$(date +%s)
echo "== qemu exit=$qrc after $((t2 - t1)) s (console: $WORK/console.log, results: $SHARE/results)"
if [ ! -f "$SHARE/results/tier.txt" ]; then
  echo "== vm-test FAIL: the guest wrote no results"; tail -40 "$WORK/console.log"
  [ -f "$SHARE/results/guest.log" ] && tail -40 "$SHARE/results/guest.log"
  exit 1
fi
cat "$SHARE/results/tier.txt"
rc=$(sed -n 's/^TIER_EXIT=//p' "$SHARE/results/guest.log")
echo "== vm-test total $((t2 - t0)) s"
if [ "$rc" != 0 ]; then echo "== vm-test FAIL (tier exit $rc; guest log: $SHARE/results/guest.log)"; exit 1; fi
echo "== vm-test PASS"
