"""The Vagrant box's provisioning, without a box (none can be downloaded here): every host path the
Vagrantfile and provision.sh refer to exists, the scripts parse and fail loudly, the box is a
supported Fedora, and the entry points provision.sh writes (packaging/entry-points.sh) run."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT, SEALBUS

SRC = Path(ROOT)
VAGRANTFILE = SRC / "vagrant/Vagrantfile"
PROVISION = SRC / "vagrant/provision.sh"
SCRIPTS = [
    PROVISION,
    *(SRC / p for p in ("packaging/entry-points.sh", "packaging/build-rpm.sh", "man/install.sh", "scripts/install.sh")),
]
PRODUCED = {"build/rpm"}  # made by `make rpm` before `vagrant up` (the Vagrantfile refuses to start without it)


def referenced_paths() -> set[str]:
    """Project paths, relative to the tree: /vagrant/X in the Vagrantfile (the synced project), and
    $SRC/X or $PREFIX/src/X (the copy of the project) in provision.sh."""
    vf = VAGRANTFILE.read_text()
    paths = set(re.findall(r"/vagrant/([\w./-]+)", vf))
    paths |= {p for p in re.findall(r'"\.\./([\w./-]+)"', vf)}
    pv = PROVISION.read_text()
    paths |= set(re.findall(r"\$(?:SRC|PREFIX/src)/([\w./-]+)", pv))
    paths |= {m.replace(".", "/") + ".py" for m in re.findall(r"-m (tests(?:\.\w+)+)", pv)}
    return {p.rstrip("/") for p in paths}


def test_every_path_the_box_uses_exists_in_the_tree():
    paths = referenced_paths()
    assert {"vagrant/provision.sh", "packaging/entry-points.sh", "tests/vm/launch_helper.py", "policy",
            "systemd/sealbus.service", "tests/vm/enforcing_tier.py", "build/rpm"} <= paths, paths  # fmt: skip
    missing = sorted(p for p in paths - PRODUCED if not (SRC / p).exists())
    assert not missing, f"the Vagrantfile or provision.sh refers to paths that do not exist: {missing}"
    makefile = (SRC / "Makefile").read_text()
    assert re.search(r"^rpm:.*\n\tpackaging/build-rpm\.sh build/rpm$", makefile, re.M), "make rpm must fill build/rpm"
    # the qemu tier runs the same provisioning script
    assert "vagrant/provision.sh" in (SRC / "vagrant/qemu/guest-run.sh").read_text()


def test_box_is_a_supported_fedora_that_installs_the_rpms():
    vf = VAGRANTFILE.read_text()
    box = re.search(r'"SEALBUS_BOX", "fedora/(\d+)-cloud-base"', vf)
    assert box and int(box.group(1)) >= 43, "fedora/40 and 41 are past their end of life"
    assert '"SEALBUS_INSTALL" => "rpm"' in vf and "scripts/sealbus" not in vf
    inline = re.search(r"<<-SHELL\n(.*?)SHELL", vf, re.S).group(1)
    assert inline.strip().startswith("set -euo pipefail") and "|| true" not in inline
    pv = PROVISION.read_text()
    assert re.search(r'dnf -y install "\$\{rpms\[@\]\}"', pv)
    assert "systemctl enable sealbus.socket" in pv and "semodule -lfull" in pv


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse_and_fail_loudly(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    first = next(ln for ln in script.read_text().splitlines() if ln.strip() and not ln.startswith("#"))
    assert re.fullmatch(r"set -E?euo pipefail|set -eu", first), f"{script.name} starts with {first!r}"
    assert "|| true" not in script.read_text()
    if shutil.which("shellcheck"):
        sc = subprocess.run(["shellcheck", "-S", "warning", str(script)], capture_output=True, text=True)
        assert sc.returncode == 0, sc.stdout


def test_provision_stops_before_touching_anything_without_rpms(tmp_path):
    """The rpm install checks its packages first: none there, it stops with the command that makes them."""
    env = {"PATH": "/usr/bin:/bin", "SEALBUS_INSTALL": "rpm", "SEALBUS_RESULTS": str(tmp_path / "out"),
           "SEALBUS_RPMS": str(tmp_path / "none")}  # fmt: skip
    proc = subprocess.run(["bash", str(PROVISION), str(tmp_path)], capture_output=True, text=True, timeout=60,
                          env=env, check=False)  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "make rpm" in proc.stderr and "copy the project" not in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.parametrize("mode", ["package", "source"])
def test_entry_points_run(tmp_path, mode):
    """The launcher and broker provision.sh (source) and the spec (package) write: Python that runs."""
    python = str(Path(SEALBUS).parent / "python")
    src, config = ("", "/etc/sealbus/system.conf") if mode == "package" else (str(SRC), "")
    subprocess.run(["sh", str(SRC / "packaging/entry-points.sh"), str(tmp_path), python, src, config], check=True)
    launcher, broker = tmp_path / "sealbus-launcher", tmp_path / "sealbus-broker"
    assert launcher.read_text().startswith(f"#!{python} -IB\n") and broker.stat().st_mode & 0o111
    out = subprocess.run([str(launcher), "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0 and "--runtime-dir" in out.stdout, out.stderr
    assert ('"--config", "/etc/sealbus/system.conf"' in launcher.read_text()) == (mode == "package")
    out = subprocess.run([str(broker), "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0 and "--control-fd" in out.stdout, out.stderr
