#!/bin/bash
# provision.sh [SRC] - install sealbus from SRC (default /vagrant), build and load
# the SELinux module, label the entry points, and run the enforcing tier.
# Used by the Vagrantfile (Fedora) and by the qemu harness (Debian guest, offline:
# SEALBUS_OFFLINE=1, the venv with the Python deps is already in the image).
# Results: $SEALBUS_RESULTS (default /var/tmp/sealbus-results)/tier.json + tier.txt
set -uo pipefail
SRC=${1:-/vagrant}
OUT=${SEALBUS_RESULTS:-/var/tmp/sealbus-results}
PREFIX=/opt/sealbus
mkdir -p "$OUT"

step() { echo; echo "### $*"; }

step "install the project into $PREFIX/src"
rm -rf "$PREFIX/src"; mkdir -p "$PREFIX/src"
tar -C "$SRC" --exclude=.venv --exclude=.git --exclude='__pycache__' --exclude=.hypothesis -cf - . | tar -C "$PREFIX/src" -xf -
if [ ! -x "$PREFIX/venv/bin/python" ]; then
  [ "${SEALBUS_OFFLINE:-0}" = 1 ] && { echo "offline and no $PREFIX/venv" >&2; exit 1; }
  if command -v dnf >/dev/null; then
    dnf -y -q install python3 python3-libselinux python3-devel gcc make fuse3 fuse3-devel libcap-devel \
      libseccomp selinux-policy-devel policycoreutils-python-utils audit
  fi
  python3 -m venv --system-site-packages "$PREFIX/venv"
  "$PREFIX/venv/bin/pip" install -q trio jeepney pyfuse3 python-prctl landlock pyseccomp
fi
id sealbus >/dev/null 2>&1 || useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin sealbus

step "entry points"
mkdir -p /usr/libexec/sealbus
# Python scripts, not shell wrappers: the domains map their interpreter, and
# the broker's domain may map nothing but python and its libraries.
cat > /usr/libexec/sealbus/sealbus-launcher <<EOS
#!$PREFIX/venv/bin/python -IB
# sealbus_launch_exec_t: init (or root) enters sealbus_launch_t here.
import sys
sys.path.insert(0, "$PREFIX/src")
from broker.cli import main
sys.exit(main(["run", "--system", *sys.argv[1:]]))
EOS
cat > /usr/libexec/sealbus/sealbus-broker <<EOS
#!$PREFIX/venv/bin/python -IB
# sealbus_exec_t: the launcher enters sealbus_t by executing this.
import runpy, sys
sys.path.insert(0, "$PREFIX/src")
runpy.run_module("broker.launch.broker_process", run_name="__main__")
EOS
install -m 0755 "$PREFIX/src/tests/vm/launch_helper.py" /usr/libexec/sealbus/sealbus-test-launch-helper
chmod 0755 /usr/libexec/sealbus/sealbus-launcher /usr/libexec/sealbus/sealbus-broker

step "build and load the policy module"
rm -rf /tmp/sealbus-policy && cp -r "$PREFIX/src/policy" /tmp/sealbus-policy
( cd /tmp/sealbus-policy && make -f /usr/share/selinux/devel/Makefile sealbus.pp ) || exit 1
semodule -i /tmp/sealbus-policy/sealbus.pp || exit 1
if [ "${SEALBUS_VM_DIAG:-0}" != 0 ]; then
  echo "diagnostics: dontaudit rules off (semodule -DB): hidden denials reach the audit log"
  semodule -DB || exit 1
fi
restorecon -R /usr/libexec/sealbus "$PREFIX"
mkdir -p /run/sealbus && restorecon -R /run/sealbus
# The test helper stands in for the launcher's privileged steps: same domain.
chcon -t sealbus_launch_exec_t /usr/libexec/sealbus/sealbus-test-launch-helper
ls -Z /usr/libexec/sealbus/

step "systemd units (how a packaged install runs it; the tier starts and stops them)"
install -D -m 0644 "$PREFIX/src/systemd/sealbus.service" /etc/systemd/system/sealbus.service
install -D -m 0644 "$PREFIX/src/systemd/sealbus.socket" /etc/systemd/system/sealbus.socket
install -D -m 0644 "$PREFIX/src/systemd/sysusers.conf" /usr/lib/sysusers.d/sealbus.conf
install -D -m 0644 "$PREFIX/src/systemd/tmpfiles.conf" /usr/lib/tmpfiles.d/sealbus.conf
if [ -d /run/systemd/system ]; then
  systemd-sysusers /usr/lib/sysusers.d/sealbus.conf || true
  systemctl daemon-reload
fi

step "enforcing tier"
cd "$PREFIX/src" && "$PREFIX/venv/bin/python" -m tests.vm.enforcing_tier --out "$OUT/tier.json" | tee "$OUT/tier.txt"
rc=${PIPESTATUS[0]}
cp /var/log/audit/audit.log "$OUT/audit.log" 2>/dev/null
exit "$rc"
