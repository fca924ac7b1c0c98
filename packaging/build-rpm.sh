#!/bin/bash
# build-rpm.sh [OUT] - build the SRPM and the binary RPMs (sealbus, sealbus-selinux) of the
# working tree into OUT (default build/rpm), with a private rpmbuild top directory.
# The source tarball is a clean copy of the tree: the files git tracks or would track
# (ignored ones such as .venv, __pycache__, build/ and .git itself never go in), as they
# are in the working tree, uncommitted changes included.
# RPM_PYTHON_VERSION=X.Y: the target's Python where this rpmbuild has no Fedora Python
# macros (packaging/fallback-python.macros); SELINUX_POLICY_VERSION=V: the selinux-policy
# to require at least, likewise.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-build/rpm}
version=$(sed -n 's/^Version: *//p' packaging/sealbus.spec)
top=$(mktemp -d "${TMPDIR:-/tmp}/sealbus-rpmbuild.XXXXXX")
trap 'rm -rf "$top"' EXIT
mkdir -p "$top/SOURCES" "$top/SPECS"

git ls-files -z --cached --others --exclude-standard \
  | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
  | tar --null -T - --owner=0 --group=0 --numeric-owner --transform "s,^,sealbus-$version/," \
        -czf "$top/SOURCES/sealbus-$version.tar.gz"
cp packaging/fallback-*.macros "$top/SOURCES/"
cp systemd/sysusers.conf "$top/SOURCES/sealbus.sysusers"  # %sysusers_create_compat reads it when the spec is parsed
cp packaging/sealbus.spec "$top/SPECS/"

args=(--define "_topdir $top")
# Debian's rpm has an empty package database: the BuildRequires are Debian packages there
rpm -q rpm >/dev/null 2>&1 || args+=(--nodeps)
# %check imports the package with the runtime dependencies of the project's venv, where it has one
if [ -x .venv/bin/python ]; then
    args+=(--define "_sealbus_deps_sitelib $(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')")
fi
[ -z "${RPM_PYTHON_VERSION:-}" ] || args+=(--define "fallback_python3_version $RPM_PYTHON_VERSION")
[ -z "${SELINUX_POLICY_VERSION:-}" ] || args+=(--define "_selinux_policy_version $SELINUX_POLICY_VERSION")
rpmbuild -ba "${args[@]}" "$top/SPECS/sealbus.spec"

rm -rf "$out" && mkdir -p "$out"
cp "$top"/SRPMS/*.src.rpm "$top"/RPMS/noarch/*.rpm "$out/"
ls -1 "$out"
