#!/bin/bash
# provision.sh [SRC] - install sealbus in an SELinux guest and run the enforcing tier.
#
# Two ways to install, one set of checks:
#   rpm     the packages `make rpm` built on the host (SEALBUS_RPMS, default SRC/build/rpm):
#           `dnf install` of sealbus and sealbus-selinux, whose %post loads the module at
#           priority 200 and whose files carry the module's labels. The Vagrant box (Fedora).
#   source  the tree at SRC under /opt/sealbus with a venv; the module built with the
#           distribution's devel Makefile and loaded with semodule -i. The local qemu tier
#           (Debian guest, offline: SEALBUS_OFFLINE=1, the venv is already in the image).
# SEALBUS_INSTALL=rpm|source chooses; default: rpm when dnf exists, else source. Either way the
# test module policy/test/sealbus_test (the tier's demo domains, never packaged) is built and loaded.
# SEALBUS_INSTALL_ONLY=1: stop once installed and labelled (vagrant/qemu/guest-systembus.sh).
# Then: the entry points' labels, the enforcing tier (tests/vm/enforcing_tier.py, from SRC),
# and, after it, sealbus.socket enabled and answering. Every step fails loudly.
# Results: $SEALBUS_RESULTS (default /var/tmp/sealbus-results)/tier.json + tier.txt + audit.log
set -Eeuo pipefail
SRC=${1:-/vagrant}
OUT=${SEALBUS_RESULTS:-/var/tmp/sealbus-results}
PREFIX=/opt/sealbus
LIBEXEC=/usr/libexec/sealbus
mkdir -p "$OUT"

step() { echo; echo "### $*"; }
die() { echo "provision.sh: $*" >&2; exit 1; }
trap 'echo "provision.sh: FAILED at line $LINENO: $BASH_COMMAND" >&2' ERR

mode=${SEALBUS_INSTALL:-}
[ -n "$mode" ] || { if command -v dnf >/dev/null; then mode=rpm; else mode=source; fi; }

rpms=()
modules=()  # policy packages to load with the test module, in one semodule call (each load rebuilds the policy)
check_rpms() {  # before anything is touched: the packages are there and fit this system's Python
  local dir=${SEALBUS_RPMS:-$SRC/build/rpm} want have
  rpms=("$dir"/sealbus-[0-9]*.noarch.rpm "$dir"/sealbus-selinux-[0-9]*.noarch.rpm)
  for r in "${rpms[@]}"; do [ -f "$r" ] || die "no $r: run 'make rpm' on the host first (vagrant/README.md)"; done
  want=$(rpm -qp --requires "${rpms[0]}" | sed -n 's/^python(abi) = //p')
  have=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || echo none)
  [ "$want" = "$have" ] || die "the RPMs are for Python $want, this system has $have: on the host, make rpm RPM_PYTHON_VERSION=$have"
}

install_rpm() {
  step "dnf install ${rpms[*]##*/}"
  # the enforcing tier's own tools, then the packages (their dependencies from the Fedora repositories)
  dnf -y -q install python3 python3-jeepney policycoreutils policycoreutils-python-utils selinux-policy-targeted \
    selinux-policy-devel audit fuse3 systemd
  dnf -y install "${rpms[@]}"
  # the broker's seccomp and Landlock bindings are not packaged in Fedora (packaging/README.md):
  # from PyPI into /usr/local, with the sandbox's other two from Fedora
  dnf -y -q install python3-pip python3-prctl python3-pyfuse3
  python3 -m pip install -q pyseccomp landlock
  rpm -q sealbus sealbus-selinux
  semodule -lfull | grep -E '^200 +sealbus ' || die "sealbus-selinux did not load the module at priority 200"
  export SEALBUS_VM_PYTHON=/usr/bin/python3  # probes import broker from the installed package
}

install_source() {
  if [ ! -x "$PREFIX/venv/bin/python" ]; then
    [ "${SEALBUS_OFFLINE:-0}" = 1 ] && die "offline and no $PREFIX/venv"
    if command -v dnf >/dev/null; then
      dnf -y -q install python3 python3-libselinux python3-devel gcc make fuse3 fuse3-devel libcap-devel \
        libseccomp selinux-policy-devel policycoreutils-python-utils audit
    fi
    python3 -m venv --system-site-packages "$PREFIX/venv"
    "$PREFIX/venv/bin/pip" install -q trio jeepney pyfuse3 python-prctl landlock pyseccomp
  fi
  id sealbus >/dev/null 2>&1 || useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin sealbus
  step "entry points"
  bash "$PREFIX/src/packaging/entry-points.sh" "$LIBEXEC" "$PREFIX/venv/bin/python" "$PREFIX/src"
  step "build the policy module (loaded with the test module below)"
  rm -rf /tmp/sealbus-policy && mkdir /tmp/sealbus-policy
  cp "$PREFIX/src/policy/"sealbus.* /tmp/sealbus-policy/
  (cd /tmp/sealbus-policy && make -f /usr/share/selinux/devel/Makefile sealbus.pp)
  modules+=(/tmp/sealbus-policy/sealbus.pp)
  step "systemd units (how a packaged install runs it)"
  install -D -m 0644 "$PREFIX/src/systemd/sealbus.service" /etc/systemd/system/sealbus.service
  install -D -m 0644 "$PREFIX/src/systemd/sealbus.socket" /etc/systemd/system/sealbus.socket
  install -D -m 0644 "$PREFIX/src/systemd/sysusers.conf" /usr/lib/sysusers.d/sealbus.conf
  install -D -m 0644 "$PREFIX/src/systemd/tmpfiles.conf" /usr/lib/tmpfiles.d/sealbus.conf
  if [ -d /run/systemd/system ]; then
    systemd-sysusers /usr/lib/sysusers.d/sealbus.conf
    systemctl daemon-reload
  fi
}

case "$mode" in
  rpm) check_rpms ;;
  source) ;;
  *) die "SEALBUS_INSTALL must be rpm or source, not $mode" ;;
esac

step "copy the project (tests and policy sources) to $PREFIX/src"
rm -rf "$PREFIX/src"; mkdir -p "$PREFIX/src"
tar -C "$SRC" --exclude=.venv --exclude=.git --exclude='__pycache__' --exclude=.hypothesis --exclude=./build \
  -cf - . | tar -C "$PREFIX/src" -xf -

if [ "$mode" = rpm ]; then install_rpm; else install_source; fi

step "build the test module sealbus_test (the tier's demo domains; never packaged), load the modules"
rm -rf /tmp/sealbus-test-policy && mkdir /tmp/sealbus-test-policy
cp "$PREFIX/src/policy/test/"sealbus_test.* /tmp/sealbus-test-policy/
# the production interfaces: installed by sealbus-selinux (rpm), else from the tree (the devel Makefile
# reads a local .if only next to its .te; only sealbus_test.pp is made)
[ -f /usr/share/selinux/devel/include/distributed/sealbus.if ] || cp "$PREFIX/src/policy/"sealbus.* /tmp/sealbus-test-policy/
(cd /tmp/sealbus-test-policy && make -f /usr/share/selinux/devel/Makefile sealbus_test.pp)
modules+=(/tmp/sealbus-test-policy/sealbus_test.pp)
load=(); for m in "${modules[@]}"; do load+=(-i "$m"); done
semodule "${load[@]}"

if [ "${SEALBUS_VM_DIAG:-0}" != 0 ]; then
  echo "diagnostics: dontaudit rules off (semodule -DB): hidden denials reach the audit log"
  semodule -DB
fi

step "labels of the entry points and the runtime directory"
python=${SEALBUS_VM_PYTHON:-$PREFIX/venv/bin/python}
# the tier's stand-in for the launcher's privileged steps runs in the launcher's domain
sed "1s|^#!.*|#!$python|" "$PREFIX/src/tests/vm/launch_helper.py" > "$LIBEXEC/sealbus-test-launch-helper"
chmod 0755 "$LIBEXEC/sealbus-test-launch-helper"
restorecon -R "$LIBEXEC" "$PREFIX"
mkdir -p /run/sealbus && restorecon -R /run/sealbus
chcon -t sealbus_launch_exec_t "$LIBEXEC/sealbus-test-launch-helper"
ls -Z "$LIBEXEC/"
[[ $(stat -c %C "$LIBEXEC/sealbus-launcher") == *:sealbus_launch_exec_t:* ]] || die "sealbus-launcher is not sealbus_launch_exec_t"
[[ $(stat -c %C "$LIBEXEC/sealbus-broker") == *:sealbus_exec_t:* ]] || die "sealbus-broker is not sealbus_exec_t"

if [ "${SEALBUS_INSTALL_ONLY:-0}" = 1 ]; then  # the system-bus VM tier: installed, its own tier follows
  echo "provision.sh: installed ($mode install), no tier run (SEALBUS_INSTALL_ONLY=1)"
  exit 0
fi

step "sealbus.socket enabled (started on demand; the tier starts and stops the units itself)"
if [ -d /run/systemd/system ]; then
  systemctl enable sealbus.socket
  systemctl stop sealbus.service sealbus.socket
fi

step "enforcing tier ($mode install)"
rc=0
(cd "$PREFIX/src" && "$python" -m tests.vm.enforcing_tier --out "$OUT/tier.json") | tee "$OUT/tier.txt" || rc=$?
cp /var/log/audit/audit.log "$OUT/audit.log" 2>/dev/null || echo "no /var/log/audit/audit.log to keep"
[ "$rc" = 0 ] || die "the enforcing tier failed (exit $rc): $OUT/tier.txt"

if [ "$mode" = rpm ] && [ -d /run/systemd/system ]; then
  step "the enabled socket answers (socket activation of sealbus.service, enforcing)"
  systemctl start sealbus.socket
  busctl --address=unix:path=/run/sealbus/system_bus_socket list >/dev/null
  systemctl is-active sealbus.service
fi
echo "provision.sh: all steps passed ($mode install)"
