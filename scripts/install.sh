#!/bin/sh
# `make install`: systemd units, sysusers/tmpfiles, man pages, and the two entry points
# (/usr/libexec/sealbus/sealbus-launcher -> sealbus_launch_exec_t,
#  /usr/libexec/sealbus/sealbus-broker  -> sealbus_exec_t).
set -eu
cd "$(dirname "$0")/.."
SRC=$(pwd)
PY="$SRC/.venv/bin/python"
install -d /usr/libexec/sealbus /etc/systemd/system /usr/lib/sysusers.d /usr/lib/tmpfiles.d
packaging/entry-points.sh /usr/libexec/sealbus "$PY" "$SRC"
install -m 0644 systemd/sealbus.service systemd/sealbus.socket /etc/systemd/system/
install -m 0644 systemd/sysusers.conf /usr/lib/sysusers.d/sealbus.conf
install -m 0644 systemd/tmpfiles.conf /usr/lib/tmpfiles.d/sealbus.conf
# man sealbus, man sealbus.conf, man sealbus-policy (MANDIR: where man(1) looks for local software)
man/install.sh "${MANDIR:-/usr/local/share/man}"
if command -v systemd-sysusers >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    systemd-sysusers /usr/lib/sysusers.d/sealbus.conf
    systemd-tmpfiles --create /usr/lib/tmpfiles.d/sealbus.conf
    systemctl daemon-reload
else
    id sealbus >/dev/null 2>&1 || useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin sealbus
fi
if command -v selinuxenabled >/dev/null 2>&1 && selinuxenabled; then
    make -C policy -f /usr/share/selinux/devel/Makefile sealbus.pp && semodule -i policy/sealbus.pp
    chcon -t sealbus_launch_exec_t /usr/libexec/sealbus/sealbus-launcher
    chcon -t sealbus_exec_t /usr/libexec/sealbus/sealbus-broker
fi
echo "installed: systemctl enable --now sealbus.socket sealbus.service"
