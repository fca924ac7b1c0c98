#!/bin/sh
# Idempotent set-up: Debian packages the project needs, then .venv with the
# distribution's interpreter (so python3-selinux and setools are importable).
# One line per step that has work to do; a tool's own output (apt, pip, make)
# only when it fails. On a tree already set up it prints one line.
set -eu
cd "$(dirname "$0")/.."

log=$(mktemp "${TMPDIR:-/tmp}/sealbus-setup.XXXXXX")
trap 'rm -f "$log"' EXIT INT TERM
did=""

step() {  # step WHAT COMMAND...: say what is done, run it quietly, show its output only if it fails
    what=$1; shift
    printf 'setup: %s ... ' "$what" >&2
    start=$(date +%s)
    if "$@" >"$log" 2>&1; then
        echo "done ($(($(date +%s) - start)) s)" >&2
        did="$did $what"
    else
        rc=$?
        echo "FAILED; its output:" >&2
        cat "$log" >&2
        exit "$rc"
    fi
}

PKGS="python3-venv python3-dev gcc pkg-config make
fuse3 libfuse3-dev libcap-dev libsystemd-dev
python3-selinux python3-setools python3-matplotlib
selinux-policy-dev selinux-policy-default checkpolicy setools policycoreutils semodule-utils
dbus dbus-bin dbus-daemon dbus-broker dbus-tests libglib2.0-bin systemd
qemu-system-x86 qemu-utils mmdebstrap e2fsprogs linux-image-amd64 passwd util-linux
rpm rpmlint groff-base man-db cpio bzip2 python3-pip"

missing=""
for p in $PKGS; do
    st=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
    case "$st" in *"install ok installed"*) ;; *) missing="$missing $p" ;; esac
done
SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
install_debs() {
    $SUDO apt-get update -qq &&
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq -o DPkg::Lock::Timeout=600 \
            --no-install-recommends $missing
}
if [ -n "$missing" ]; then
    step "installing Debian packages:$missing" install_debs
fi

if [ ! -x .venv/bin/python ]; then
    step "creating .venv (system site packages: python3-selinux, setools)" \
        /usr/bin/python3 -m venv --system-site-packages .venv
fi
stamp=.venv/.installed
pip_install() {
    .venv/bin/python -m pip install -q --upgrade pip && .venv/bin/python -m pip install -q -e '.[test]' && touch "$stamp"
}
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ ! -x .venv/bin/sealbus ]; then
    step "installing sealbus and its test tools into .venv (pip, ~1 min)" pip_install
fi
# The compiled hot path (Cython, pure-Python mode: setup.py). Optional: a module that does not compile
# stays pure Python (setup.py says so), and SEALBUS_PURE_PYTHON=1 skips the build. Rebuilds only what
# changed. The venv's setuptools must read pyproject.toml's PEP 639 license (77 and later).
upgrade_setuptools() { .venv/bin/python -m pip install -q 'setuptools>=77'; }
if ! .venv/bin/python -c 'import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) < 77)'; then
    step "upgrading the venv's setuptools (pyproject's license needs 77 or later)" upgrade_setuptools
fi
build() { .venv/bin/python -c 'import broker; print(broker.build())'; }
if [ -z "${SEALBUS_PURE_PYTHON:-}" ] && [ "$(build)" != compiled ]; then
    printf 'setup: compiling the hot path (Cython, setup.py) ... ' >&2
    if .venv/bin/python setup.py -q build_ext --inplace >"$log" 2>&1; then
        echo "done: $(build)" >&2
    else
        echo "not built, pure Python runs; the compiler said:" >&2
        tail -n 20 "$log" >&2
    fi
    did="$did cython"
fi
# Bytecode for the package (an editable install compiles nothing): without it every bus a test or a harness
# starts compiles ~50 modules again whenever PYTHONDONTWRITEBYTECODE is set (issue #18, start-up time).
# Only changed files are recompiled; a stale one is ignored by the interpreter, never used.
.venv/bin/python -m compileall -q broker >&2
# The load generator for benchmarks and the payload tests (C, sd-bus).
if ! make -q -C benchmarks/dbench >/dev/null 2>&1; then
    step "building benchmarks/dbench (C load generator)" make -s -C benchmarks/dbench
fi
# The real system.d policy files for the dbus-daemon differential test (downloaded .debs, nothing installed).
# Not fatal: tests/test_policy_corpus.py retries; the script says what it fetched or why it could not.
if ! scripts/policy-corpus.sh --check; then
    scripts/policy-corpus.sh 2>&1 | sed 's/^/setup: /' >&2
    did="$did policy-corpus"
fi
[ -n "$did" ] || echo "setup: up to date (.venv, Debian packages, dbench, policy corpus)" >&2
