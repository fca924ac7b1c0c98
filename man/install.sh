#!/bin/sh
# man/install.sh MANDIR - install the man pages under MANDIR (e.g. /usr/local/share/man,
# or the RPM's %{buildroot}%{_mandir}): section N pages go to MANDIR/manN.
# The one place that knows which pages exist; `make install` and packaging/sealbus.spec use it.
set -eu
[ $# -eq 1 ] || { echo "usage: man/install.sh MANDIR" >&2; exit 2; }
here=$(dirname "$0")
for page in "$here"/*.[1-8]; do
    section=${page##*.}
    install -D -m 0644 "$page" "$1/man$section/$(basename "$page")"
done
