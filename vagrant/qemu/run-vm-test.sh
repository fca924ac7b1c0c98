#!/bin/bash
# run-vm-test.sh - the enforcing SELinux tier in a qemu guest (make vm-test).
# Builds (or reuses) the cached image, boots it twice with SELinux enforcing and
# no network device, sharing the project over 9p: the enforcing tier
# (tests/vm/enforcing_tier.py), then with sealbus.systembus=1 the system-bus tier
# (tests/vm/systembus_tier.py: sealbus is the machine's system bus). Fails unless
# every case of both passed (XFAIL allowed, reported). SEALBUS_VM_BOOTS=1 or 2: only that boot.
#   WORK=/var/tmp/sealbus-vm (image cache), TIMEOUT=1500 (per boot), SMP=2, ACCEL=auto|kvm|tcg
#   SEALBUS_VM_DIAG=1: diagnose in the guest: dontaudit rules off (semodule -DB),
#   so denials the policy hides (e.g. nsswitch domains reading selinuxfs) reach audit.log
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
TOP=$(cd "$HERE/../.." && pwd)
export WORK=${WORK:-/var/tmp/sealbus-vm}
SHARE=$WORK/share
TIMEOUT=${TIMEOUT:-1500}  # per boot: the second installs and loads the policy module early in boot
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

# boot NAME RESULTS LOG [KERNEL OPTIONS...]: one boot of the image (-snapshot: nothing it
# writes outlives it), the in-guest tier's table, 0 if every case passed (XFAIL allowed)
boot() {
  local name=$1 results=$2 log=$3 b0 b1 qrc rc
  shift 3
  b0=$(date +%s)
  set +e
  timeout "$TIMEOUT" qemu-system-x86_64 "${ACC[@]}" -smp "$SMP" -m 2048 \
    -nographic -nic none -no-reboot -snapshot \
    -kernel "$WORK/vmlinuz" -initrd "$WORK/initrd.img" \
    -append "root=/dev/vda rw console=ttyS0 quiet security=selinux selinux=1 enforcing=1 $*" \
    -drive file="$WORK/rootfs.img",format=raw,if=virtio \
    -virtfs local,path="$SHARE",mount_tag=host,security_model=none,id=host \
    </dev/null > "$log" 2>&1
  qrc=$?
  set -e
  b1=$(date +%s)
  echo "== $name: qemu exit=$qrc after $((b1 - b0)) s (console: $log, results: $results)"
  if [ ! -f "$results/tier.txt" ]; then
    echo "== $name FAIL: the guest wrote no results"; tail -40 "$log"
    [ -f "$results/install.log" ] && tail -40 "$results/install.log"
    [ -f "$results/guest.log" ] && tail -40 "$results/guest.log"
    return 1
  fi
  cat "$results/tier.txt"
  rc=$(sed -n 's/^TIER_EXIT=//p' "$results/guest.log")
  if [ "$rc" != 0 ]; then echo "== $name FAIL (tier exit $rc; guest log: $results/guest.log)"; return 1; fi
  echo "== $name PASS"
}

# 1. the enforcing tier: dbus-daemon is the system bus, sealbus is installed and tested beside it
# 2. sealbus.systembus=1: sealbus is the machine's system bus from early boot (guest-systembus.sh)
fail=0
BOOTS=${SEALBUS_VM_BOOTS:-1 2}
case " $BOOTS " in *" 1 "*) boot "enforcing tier" "$SHARE/results" "$WORK/console.log" || fail=1 ;; esac
case " $BOOTS " in *" 2 "*) boot "system-bus tier" "$SHARE/results-systembus" "$WORK/console-systembus.log" \
                              sealbus.systembus=1 || fail=1 ;; esac
t2=$(date +%s)
echo "== vm-test total $((t2 - t0)) s"
if [ "$fail" != 0 ]; then echo "== vm-test FAIL"; exit 1; fi
echo "== vm-test PASS"
