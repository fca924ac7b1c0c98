#!/bin/sh
# Idempotent set-up: Debian packages the project needs, then .venv with the
# distribution's interpreter (so python3-selinux and setools are importable).
set -eu
cd "$(dirname "$0")/.."

PKGS="python3-venv python3-dev gcc pkg-config make
fuse3 libfuse3-dev libcap-dev libsystemd-dev
python3-selinux python3-setools python3-matplotlib
selinux-policy-dev selinux-policy-default checkpolicy setools policycoreutils semodule-utils
dbus dbus-bin dbus-daemon dbus-broker dbus-tests libglib2.0-bin systemd
qemu-system-x86 qemu-utils mmdebstrap e2fsprogs linux-image-amd64 passwd util-linux
rpm rpmlint groff-base man-db"

missing=""
for p in $PKGS; do
    st=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
    case "$st" in *"install ok installed"*) ;; *) missing="$missing $p" ;; esac
done
if [ -n "$missing" ]; then
    echo "setup: installing Debian packages:$missing" >&2
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >&2
fi

if [ ! -x .venv/bin/python ]; then
    /usr/bin/python3 -m venv --system-site-packages .venv
fi
stamp=.venv/.installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ ! -x .venv/bin/sealbus ]; then
    .venv/bin/python -m pip install -q --upgrade pip >&2
    .venv/bin/python -m pip install -q -e '.[test]' >&2
    touch "$stamp"
fi
# Bytecode for the package (an editable install compiles nothing): without it every bus a test or a harness
# starts compiles ~50 modules again whenever PYTHONDONTWRITEBYTECODE is set (issue #18, start-up time).
# Only changed files are recompiled; a stale one is ignored by the interpreter, never used.
.venv/bin/python -m compileall -q broker >&2
# The load generator for benchmarks and the payload tests (C, sd-bus).
make -s -C benchmarks/dbench >&2
# The real system.d policy files for the dbus-daemon differential test (downloaded .debs, nothing installed).
scripts/policy-corpus.sh || echo "setup: could not fetch the policy corpus (tests/test_policy_corpus.py will retry)" >&2
