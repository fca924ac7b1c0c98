"""The RPMs of packaging/sealbus.spec, built from this tree as `make rpm` builds them
(packaging/build-rpm.sh) and inspected: the file lists hold every file a user needs and nothing
from the build tree, the SELinux scriptlets load the module at priority 200, the dependencies are
what a Fedora system can satisfy, the package's own CLI runs, and rpmlint says nothing that is not
in packaging/rpmlint-known.txt."""

import bz2
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.conftest import ROOT, SEALBUS

SRC = Path(ROOT)
VERSION = re.search(r"^Version:\s*(\S+)", (SRC / "packaging/sealbus.spec").read_text(), re.M).group(1)
PP_MAGIC = 0xF97CFF8F  # SEPOL_MODULE_PACKAGE_MAGIC: a compiled policy module package

pytestmark = [
    pytest.mark.skipif(shutil.which("rpmbuild") is None, reason="rpmbuild (Debian: rpm) is not installed"),
    pytest.mark.slow,  # one rpmbuild for the module: ~40 s (in `make test`, not `make test-fast`)
]

# Every file of the sealbus package outside site-packages, exactly (the Python package is checked
# against the source tree below).
MAIN_FILES = {
    "/etc/sealbus",
    "/etc/sealbus/system.conf",
    "/etc/sealbus/system.d",
    "/usr/bin/sealbus",
    "/usr/bin/sealbus-dbus-daemon",
    "/usr/libexec/sealbus",
    "/usr/libexec/sealbus/sealbus-launcher",
    "/usr/libexec/sealbus/sealbus-broker",
    "/usr/lib/systemd/system/sealbus.service",
    "/usr/lib/systemd/system/sealbus.socket",
    "/usr/lib/systemd/system/sealbus-dbus.service",
    "/usr/lib/sysusers.d/sealbus.conf",
    "/usr/lib/tmpfiles.d/sealbus.conf",
    "/usr/share/doc/sealbus",
    "/usr/share/doc/sealbus/README.md",
    "/usr/share/doc/sealbus/system-bus.md",
    "/usr/share/licenses/sealbus",
    "/usr/share/licenses/sealbus/LICENSE",
    "/usr/share/man/man1/sealbus.1.gz",
    "/usr/share/man/man1/sealbus-dbus-daemon.1.gz",
    "/usr/share/man/man1/sealbus-policy.1.gz",
    "/usr/share/man/man5/sealbus.conf.5.gz",
    "/usr/share/sealbus",
    "/usr/share/sealbus/system.conf",
}
SELINUX_FILES = {
    "/usr/share/selinux/packages/targeted/sealbus.pp.bz2",
    "/usr/share/selinux/devel/include/distributed/sealbus.if",
    "/var/lib/selinux/targeted/active/modules/200/sealbus",  # %ghost: semodule's store entry
    "/usr/share/licenses/sealbus-selinux",
    "/usr/share/licenses/sealbus-selinux/LICENSE",
}
LEAKS = re.compile(r"(^|/)(\.venv|\.git|__pycache__|\.pytest_cache|\.hypothesis|\.ruff_cache|build)(/|$)|\.pyc$")


class Built:
    def __init__(self, out: Path):
        self.out = out
        self.main = out / f"sealbus-{VERSION}-1.noarch.rpm"
        self.selinux = out / f"sealbus-selinux-{VERSION}-1.noarch.rpm"
        self.srpm = out / f"sealbus-{VERSION}-1.src.rpm"

    def query(self, rpm: Path, *what: str) -> str:
        return subprocess.run(["rpm", "-qp", *what, str(rpm)], capture_output=True, text=True, check=True).stdout

    def files(self, rpm: Path) -> set[str]:
        return set(self.query(rpm, "-l").split())

    def extract(self, rpm: Path, into: Path) -> Path:
        into.mkdir(parents=True, exist_ok=True)
        cpio = subprocess.run(["rpm2cpio", str(rpm)], capture_output=True, check=True).stdout
        subprocess.run(["cpio", "-idm", "--quiet"], input=cpio, cwd=into, check=True)
        return into


# Built for another Python than this machine's, as for the Vagrant box (vagrant/README.md): where this
# rpmbuild lacks Fedora's macros, RPM_PYTHON_VERSION decides site-packages and python(abi).
TARGET_PYTHON = "3.14"
FALLBACK = subprocess.run(["rpm", "--eval", "%{?pyproject_wheel}"], capture_output=True, text=True,
                          check=False).stdout.strip() == "" if shutil.which("rpm") else True  # fmt: skip


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Built:
    out = tmp_path_factory.mktemp("rpm")
    env = {**os.environ, "RPM_PYTHON_VERSION": TARGET_PYTHON}
    proc = subprocess.run([str(SRC / "packaging/build-rpm.sh"), str(out)], capture_output=True, text=True,
                          timeout=600, check=False, env=env)  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    b = Built(out)
    assert b.main.exists() and b.selinux.exists() and b.srpm.exists(), sorted(p.name for p in out.iterdir())
    return b


def _sitelib(files: set[str]) -> str:
    libs = {m.group(0) for f in files if (m := re.match(r"/usr/lib/python3\.\d+/site-packages", f))}
    assert len(libs) == 1, libs
    lib = libs.pop()
    assert lib == f"/usr/lib/python{TARGET_PYTHON}/site-packages" or not FALLBACK, lib
    return lib


def test_main_package_holds_every_file_a_user_needs_and_nothing_else(built):
    files = built.files(built.main)
    site = _sitelib(files)
    assert {f for f in files if not f.startswith(site)} == MAIN_FILES
    leaks = sorted(f for f in files if LEAKS.search(f))
    assert not leaks, f"build-tree files in the package: {leaks}"
    tracked = subprocess.run(["git", "ls-files", "broker"], cwd=SRC, capture_output=True, text=True, check=True)
    modules = {f"{site}/{p}" for p in tracked.stdout.split() if p.endswith(".py")}
    assert modules and modules <= files, sorted(modules - files)[:10]
    assert any(f.startswith(f"{site}/sealbus-{VERSION}.dist-info") for f in files)
    # the default config `sealbus run --system` reads without --config (broker.launch.launcher.DEFAULT_CONFIG)
    assert f"{site}/broker/launch/system.conf" in files


def test_packaged_files_are_root_owned_and_not_writable_by_others(built):
    """The launcher runs as root: nothing it executes, imports or reads may be writable by anyone else."""
    modes = {}
    for rpm in (built.main, built.selinux):
        rows = built.query(rpm, "--qf", "[%{FILEMODES:perms} %{FILEUSERNAME} %{FILEGROUPNAME} %{FILENAMES}\\n]")
        for perms, user, group, name in (r.split(" ", 3) for r in rows.splitlines()):
            assert (user, group) == ("root", "root"), (name, user, group)
            assert perms[5] != "w" and perms[8] != "w", (name, perms)  # no group or other write
            assert not set(perms[1:]) & {"s", "S"}, (name, perms)  # no setuid/setgid
            modes[name] = perms
    assert modes["/usr/libexec/sealbus/sealbus-launcher"] == "-rwxr-xr-x"
    assert modes["/usr/libexec/sealbus/sealbus-broker"] == "-rwxr-xr-x"
    assert modes["/etc/sealbus/system.conf"] == "-rw-r--r--"
    assert "/etc/sealbus/system.conf" in built.query(built.main, "--configfiles").split()


def test_selinux_package_holds_the_compiled_module(built, tmp_path):
    assert built.files(built.selinux) == SELINUX_FILES
    root = built.extract(built.selinux, tmp_path / "root")
    pp = bz2.decompress((root / "usr/share/selinux/packages/targeted/sealbus.pp.bz2").read_bytes())
    assert int.from_bytes(pp[:4], "little") == PP_MAGIC
    assert (root / "usr/share/selinux/devel/include/distributed/sealbus.if").read_text() == (
        SRC / "policy/sealbus.if"
    ).read_text()


def test_selinux_scriptlets_install_at_priority_200_and_relabel(built):
    scripts = built.query(built.selinux, "--scripts")
    parts = dict(
        re.findall(r"^(\w+) scriptlet \(using /bin/sh\):\n(.*?)(?=^\w+ scriptlet \(|\Z)", scripts, re.M | re.S)
    )
    assert set(parts) == {"preinstall", "postinstall", "postuninstall", "posttrans"}, scripts
    post = parts["postinstall"]
    assert re.search(r"semodule\b.*-X 200\b.*-i .*/usr/share/selinux/packages/targeted/sealbus\.pp\.bz2", post), post
    assert "-s" in post and "targeted" in post and "load_policy" in post
    postun = parts["postuninstall"]
    assert re.search(r"if \[ \$1 -eq 0 \]; then.*semodule\b.*-X 200\b.*-r sealbus", postun, re.S), postun
    assert "file_contexts" in parts["preinstall"]  # %selinux_relabel_pre keeps the contexts as they were
    assert "fixfiles" in parts["posttrans"]  # %selinux_relabel_post restores what the module changed


def test_main_scriptlets_create_the_user_and_leave_the_system_bus_running(built):
    scripts = built.query(built.main, "--scripts")
    assert re.search(r"^u sealbus\b", scripts, re.M) and "systemd-sysusers" in scripts  # before files land
    assert "systemd-tmpfiles --create /usr/lib/tmpfiles.d/sealbus.conf" in scripts
    assert re.search(r"preset sealbus\.socket sealbus\.service", scripts)  # presets decide; never enabled here
    assert "try-restart sealbus.service" in scripts
    # an upgrade never restarts the alternative system bus under a running system
    assert not re.search(r"try-restart[^\n]*sealbus-dbus", scripts), scripts


def test_dependencies_are_fedora_names(built):
    main = built.query(built.main, "--requires").splitlines()
    abi = [r for r in main if r.startswith("python(abi) = ")]
    assert abi == [f"python(abi) = {TARGET_PYTHON}"] or (not FALLBACK and len(abi) == 1), main
    for dep in ("trio", "jeepney"):
        assert any(re.fullmatch(rf"python3(\.\d+)?dist\({dep}\) >= [\d.]+", r) for r in main), (dep, main)
    assert f"(sealbus-selinux = {VERSION}-1 if selinux-policy-targeted)" in main
    assert "python3-libseccomp" in main  # the broker's syscall filter, through libseccomp's own binding
    sel = built.query(built.selinux, "--requires").splitlines()
    assert "selinux-policy-targeted" in sel and "policycoreutils" in sel
    every = main + sel + built.query(built.srpm, "--requires").splitlines()
    assert not [r for r in every if re.search(r"/work/|\.venv|dpkg|debian", r)], every
    provides = built.query(built.main, "--provides").splitlines()
    assert f"sealbus = {VERSION}-1" in provides and any(p.startswith("python3dist(sealbus)") for p in provides)
    assert f"sealbus-selinux = {VERSION}-1" in built.query(built.selinux, "--provides").splitlines()


def test_source_rpm_is_a_clean_copy_of_the_tree(built, tmp_path):
    root = built.extract(built.srpm, tmp_path / "srpm")
    assert {p.name for p in root.iterdir()} == {
        "sealbus.spec", f"sealbus-{VERSION}.tar.gz", "sealbus.sysusers",
        "fallback-python.macros", "fallback-systemd.macros", "fallback-selinux.macros",
    }  # fmt: skip
    with tarfile.open(root / f"sealbus-{VERSION}.tar.gz") as t:
        names = [n.split("/", 1)[1] for n in t.getnames() if "/" in n]
    leaks = sorted(n for n in names if LEAKS.search(n))
    assert not leaks, leaks
    for needed in ("pyproject.toml", "broker/cli.py", "policy/sealbus.te", "man/sealbus.1", "systemd/sealbus.service"):
        assert needed in names


def test_packaged_files_work(built, tmp_path):
    """The packaged CLI runs from the package's own site-packages; the launcher reads the /etc config,
    which includes the packaged default (the default system.conf, unchanged)."""
    root = built.extract(built.main, tmp_path / "root")
    site = root / _sitelib(built.files(built.main)).lstrip("/")
    cli = root / "usr/bin/sealbus"
    assert cli.read_text().startswith("#!/usr/bin/python3 -s\n")
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([str(Path(SEALBUS).parent / "python"), str(cli), "policy", "--help"], env=env,
                         capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert out.returncode == 0 and "explain" in out.stdout, out.stderr
    where = subprocess.run([str(Path(SEALBUS).parent / "python"), "-c", "import broker; print(broker.__file__)"],
                           env=env, cwd=tmp_path, capture_output=True, text=True, check=True)  # fmt: skip
    assert where.stdout.startswith(str(site)), where.stdout
    # `sealbus run --system` with no --config: the launcher's default is in the package, the source's file
    default = subprocess.run([str(Path(SEALBUS).parent / "python"), "-c", "from broker.launch.launcher import "
                              "DEFAULT_CONFIG; print(DEFAULT_CONFIG)"], env=env, cwd=tmp_path, capture_output=True,
                             text=True, check=True).stdout.strip()  # fmt: skip
    assert default.startswith(str(site)) and Path(default).is_file(), f"{default}: not in the package"
    assert Path(default).read_bytes() == (SRC / "broker/launch/system.conf").read_bytes()
    launcher = (root / "usr/libexec/sealbus/sealbus-launcher").read_text()
    assert launcher.startswith("#!/usr/bin/python3 -IB\n") and '"--config", "/etc/sealbus/system.conf"' in launcher
    assert "sys.path" not in launcher  # the installed package, not a source tree
    assert "broker.launch.broker_process" in (root / "usr/libexec/sealbus/sealbus-broker").read_text()
    etc = (root / "etc/sealbus/system.conf").read_text()
    assert "<include>/usr/share/sealbus/system.conf</include>" in etc and "/etc/sealbus/system.d" in etc
    assert (root / "usr/share/sealbus/system.conf").read_bytes() == (SRC / "broker/launch/system.conf").read_bytes()
    assert (root / "usr/lib/sysusers.d/sealbus.conf").read_bytes() == (SRC / "systemd/sysusers.conf").read_bytes()


@pytest.mark.skipif(shutil.which("rpmlint") is None, reason="rpmlint is not installed")
def test_rpmlint_says_nothing_new(built):
    known = {
        line.strip()
        for line in (SRC / "packaging/rpmlint-known.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    rpms = [str(built.main), str(built.selinux), str(built.srpm)]
    out = subprocess.run(["rpmlint", *rpms], capture_output=True, text=True, timeout=300, check=False)
    complaints = [ln for ln in out.stdout.splitlines() if re.match(r"^[\w.-]+: [EW]: ", ln)]
    assert complaints, out.stdout + out.stderr  # rpmlint ran and found the known ones
    new = [c for c in complaints if c not in known]
    assert not new, "rpmlint complaints not in packaging/rpmlint-known.txt:\n" + "\n".join(new)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_packaged_units_have_no_unknown_or_invalid_settings(built, tmp_path):
    root = built.extract(built.main, tmp_path / "root")
    units = sorted((root / "usr/lib/systemd/system").iterdir())
    assert [u.name for u in units] == ["sealbus-dbus.service", "sealbus.service", "sealbus.socket"]
    for unit in units:
        out = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60,
                             check=False)  # fmt: skip
        # what only an installed system has: the programs and the man pages the units name
        other = [ln for ln in (out.stdout + out.stderr).splitlines()
                 if ln.strip() and not re.search(r"is not executable|Command 'man |dbus\.socket", ln)]  # fmt: skip
        assert not other, f"{unit.name}: {other}"
    dbus = (root / "usr/lib/systemd/system/sealbus-dbus.service").read_text()
    assert re.search(r"^Alias=dbus\.service$", dbus, re.M) and re.search(r"^Sockets=dbus\.socket$", dbus, re.M)
