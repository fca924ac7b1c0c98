#!/bin/bash
# build-image.sh - the Debian bookworm guest for the enforcing SELinux tier.
#
# Cached under $WORK (default /var/tmp/sealbus-vm): rootfs.img (raw ext4,
# pre-labelled), vmlinuz, initrd.img, inputs.sha256. Rebuilt only when an input
# changes (this script, the boot hook, the units, the 9p label, the pinned Python
# deps). The project tree is NOT in the image: it comes over 9p at test time,
# so editing the project never forces a rebuild.
#
# The guest has no network, so the project's Python dependencies are built as
# wheels on the host (same bookworm/python3.11) with the project venv's pip,
# pinned to the venv's versions, and installed in the chroot with --no-index.
# Apt sources are read from the host's apt configuration at run time.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
TOP=$(cd "$HERE/../.." && pwd)
WORK=${WORK:-/var/tmp/sealbus-vm}
SUITE=${SUITE:-bookworm}
PIP=${PIP:-$TOP/.venv/bin/pip}
ROOT=$WORK/rootfs
IMG=$WORK/rootfs.img
PYDEPS=(trio jeepney pyfuse3 python-prctl landlock pyseccomp)

[ "$(id -u)" = 0 ] || { echo "build-image.sh: run as root" >&2; exit 1; }
mkdir -p "$WORK"

# Pins: the versions the host venv runs, so guest and host test the same code.
PINS=$("$PIP" list --format=freeze 2>/dev/null | grep -v '^-e' | sort)
inputs_hash() {
  { cat "$HERE/build-image.sh" "$HERE/guest-boot-hook.sh" "$HERE/sealbus-vm-test.service" "$HERE/guest-9p.cil" \
        "$HERE/sealbus-vm-systembus.service"
    printf '%s\n' "${PYDEPS[@]}"; echo "$PINS"; } | sha256sum | cut -d' ' -f1
}
WANT=$(inputs_hash)
if [ "${FORCE:-0}" != 1 ] && [ -f "$IMG" ] && [ -f "$WORK/vmlinuz" ] && [ -f "$WORK/initrd.img" ] \
   && [ "$(cat "$WORK/inputs.sha256" 2>/dev/null)" = "$WANT" ]; then
  echo "== image up to date ($WORK, inputs $WANT)"; exit 0
fi
rm -f "$WORK/inputs.sha256"
t0=$(date +%s)

echo "== step 0: wheels for the guest"
rm -rf "$WORK/wheels"; mkdir -p "$WORK/wheels"
echo "$PINS" > "$WORK/constraints.txt"
"$PIP" wheel -q -w "$WORK/wheels" -c "$WORK/constraints.txt" "${PYDEPS[@]}"
ls "$WORK/wheels"

mapfile -t SOURCES < <(apt-get indextargets --format '$(REPO_URI) $(RELEASE) $(COMPONENT)' \
        'Created-By: Packages' | awk -v s="$SUITE" '$2 ~ "^"s {print "deb " $1 " " $2 " " $3}' | sort -u)
[ ${#SOURCES[@]} -gt 0 ] || { echo "no $SUITE source in host apt config (apt-get update?)" >&2; exit 1; }

PKGS=(
  systemd-sysv udev kmod linux-image-amd64 initramfs-tools
  selinux-basics selinux-policy-default selinux-utils policycoreutils auditd
  selinux-policy-dev make m4 checkpolicy semodule-utils
  python3 python3-venv python3-selinux
  fuse3 libfuse3-3 libseccomp2 libcap2 dbus-bin util-linux procps
  # the distribution's system bus (dbus-daemon, dbus.service/dbus.socket, system.conf): the
  # first boot runs it; the second (sealbus.systembus=1) replaces it with sealbus, files unchanged
  dbus
)
INCLUDE=$(IFS=,; echo "${PKGS[*]}")

echo "== step 1: mmdebstrap rootfs"
rm -rf "$ROOT"
mmdebstrap --variant=apt --mode=root --include="$INCLUDE" \
  --aptopt='APT::Install-Recommends "false"' \
  --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --dpkgopt='path-exclude=/usr/share/locale/*' \
  --dpkgopt='path-exclude=/usr/share/info/*' \
  --customize-hook='echo sealbus-vm > "$1/etc/hostname"' \
  --customize-hook='printf "/dev/vda / ext4 rw,relatime 0 1\n" > "$1/etc/fstab"' \
  --customize-hook='sed -i -e "s/^SELINUX=.*/SELINUX=enforcing/" -e "s/^SELINUXTYPE=.*/SELINUXTYPE=default/" "$1/etc/selinux/config"' \
  --customize-hook='chroot "$1" passwd -d root' \
  --customize-hook="install -m 0755 '$HERE/guest-boot-hook.sh' \"\$1/usr/local/sbin/sealbus-vm-hook\"" \
  --customize-hook="install -m 0644 '$HERE/sealbus-vm-test.service' \"\$1/etc/systemd/system/sealbus-vm-test.service\"" \
  --customize-hook='chroot "$1" systemctl enable sealbus-vm-test.service' \
  --customize-hook="install -m 0644 '$HERE/sealbus-vm-systembus.service' \"\$1/etc/systemd/system/sealbus-vm-systembus.service\"" \
  --customize-hook='chroot "$1" systemctl enable sealbus-vm-systembus.service' \
  --customize-hook='chroot "$1" systemctl mask apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service fstrim.timer || true' \
  --customize-hook='chroot "$1" useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin sealbus' \
  "$SUITE" "$ROOT" "${SOURCES[@]}"

echo "== step 1b: Python deps into /opt/sealbus/venv (no index)"
mkdir -p "$ROOT/tmp/wheels"; cp "$WORK"/wheels/*.whl "$ROOT/tmp/wheels/"
chroot "$ROOT" python3 -m venv --system-site-packages /opt/sealbus/venv
chroot "$ROOT" env -u PIP_FIND_LINKS /opt/sealbus/venv/bin/pip install -q --no-index --find-links /tmp/wheels "${PYDEPS[@]}"
rm -rf "$ROOT/tmp/wheels"
chroot "$ROOT" /opt/sealbus/venv/bin/python -c 'import trio, jeepney, pyfuse3, prctl, landlock, pyseccomp, selinux; print("guest python deps ok")'

echo "== step 1c: policy tweaks (boot hook runs in initrc_t, 9p label)"
chroot "$ROOT" semanage fcontext -a -t initrc_exec_t '/usr/local/sbin/sealbus-vm-hook'
cp "$HERE/guest-9p.cil" "$ROOT/tmp/guest9p.cil"
chroot "$ROOT" semodule -i /tmp/guest9p.cil
rm -f "$ROOT/tmp/guest9p.cil"

echo "== step 1d: kernel + initrd out of the tree, prune unused modules"
KVER=$(ls "$ROOT/lib/modules" | sort -V | tail -1)
cp "$ROOT/boot/vmlinuz-$KVER" "$WORK/vmlinuz"
cp "$ROOT/boot/initrd.img-$KVER" "$WORK/initrd.img"
M="$ROOT/lib/modules/$KVER/kernel"
rm -rf "$M"/sound "$M"/drivers/{gpu,media,infiniband,net/wireless,net/ethernet,bluetooth,staging,isdn,usb,hid,input/joystick,iio,scsi/qla2xxx,scsi/lpfc,mmc,video} "$M"/net/{wireless,mac80211,bluetooth}
chroot "$ROOT" depmod "$KVER"
rm -rf "$ROOT"/var/cache/apt/*.bin "$ROOT"/var/lib/apt/lists/* "$ROOT"/boot/*

echo "== step 2: label the tree (setfiles on the host)"
setfiles -F -E -r "$ROOT" "$ROOT/etc/selinux/default/contexts/files/file_contexts" "$ROOT"

echo "== step 3: ext4 image (mke2fs -d keeps security.selinux xattrs)"
rm -f "$IMG"
mke2fs -q -t ext4 -L root -d "$ROOT" -E root_owner=0:0 "$IMG" 3G
rm -rf "$ROOT"
echo "$WANT" > "$WORK/inputs.sha256"
echo "== image built in $(( $(date +%s) - t0 )) s: $(du -h "$IMG" | cut -f1) allocated, kernel $KVER"
