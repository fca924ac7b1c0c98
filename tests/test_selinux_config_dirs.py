"""An <includedir> the launcher may not read is a start-up error, never "no files".

Under enforcing, /etc/dbus-1/system.d is dbusd_etc_t: before the policy granted
sealbus_launch_t its read (dbus_read_config), the listing failed with EACCES and
the old parser took that for an empty directory, so an administrator's <deny>
files vanished without a word. dbus-daemon ignores only a missing directory.

The launcher runs here as root without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH
(dropped from the bounding set by setpriv), so a mode-000 directory or file is
refused by the kernel exactly as an SELinux denial would refuse it.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from broker.access.config import ConfigError, load_config

SEALBUS = str(Path(sys.executable).with_name("sealbus"))
SETPRIV = shutil.which("setpriv")

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or SETPRIV is None, reason="needs root and setpriv to start the launcher without DAC override"
)


def write_config(tmp_path: Path) -> tuple[Path, Path]:
    """(main config, its includedir) with one <deny> file in the directory."""
    conf_dir = tmp_path / "system.d"
    conf_dir.mkdir()
    (conf_dir / "deny.conf").write_text(
        '<busconfig><policy context="mandatory"><deny own="org.example.Forbidden"/></policy></busconfig>'
    )
    main = tmp_path / "bus.conf"
    main.write_text(f"""<busconfig>
  <type>system</type>
  <listen>unix:path={tmp_path}/bus_socket</listen>
  <policy context="default"><allow own="*"/><allow send_destination="*"/></policy>
  <includedir>{conf_dir}</includedir>
</busconfig>
""")
    return main, conf_dir


def run_launcher_without_dac_override(tmp_path: Path, config: Path) -> subprocess.CompletedProcess:
    runtime = tmp_path / "run"
    cmd = [SETPRIV, "--bounding-set", "-dac_override,-dac_read_search", "--inh-caps", "-all", "--",
           SEALBUS, "run", "--system", "--config", str(config), "--runtime-dir", str(runtime)]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def test_includedir_files_are_read(tmp_path):
    main, conf_dir = write_config(tmp_path)
    cfg = load_config(str(main))
    assert str(conf_dir / "deny.conf") in cfg.files


def test_missing_includedir_is_no_files(tmp_path):
    main, conf_dir = write_config(tmp_path)
    shutil.rmtree(conf_dir)
    cfg = load_config(str(main))
    assert cfg.files == [str(main)]


@needs_root
def test_launcher_refuses_an_unreadable_includedir(tmp_path):
    main, conf_dir = write_config(tmp_path)
    conf_dir.chmod(0)
    proc = run_launcher_without_dac_override(tmp_path, main)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"<includedir> {conf_dir}: cannot list: Permission denied" in proc.stderr
    assert not (tmp_path / "run").exists()  # refused before it touched anything


@needs_root
def test_launcher_refuses_an_unreadable_file_in_includedir(tmp_path):
    main, conf_dir = write_config(tmp_path)
    (conf_dir / "deny.conf").chmod(0)
    proc = run_launcher_without_dac_override(tmp_path, main)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"{conf_dir / 'deny.conf'}: cannot read: Permission denied" in proc.stderr


def test_includedir_that_is_a_file_is_an_error(tmp_path):
    main, conf_dir = write_config(tmp_path)
    shutil.rmtree(conf_dir)
    conf_dir.write_text("not a directory")
    with pytest.raises(ConfigError, match="cannot list: Not a directory"):
        load_config(str(main))


def test_a_kernel_without_selinuxfs_is_not_selinux_enabled_without_importing_the_bindings(tmp_path):
    """selinux_enabled() reads /proc/filesystems first: without selinuxfs libselinux says 0 too, and its
    bindings (a few ms of every start) are not imported."""
    import subprocess
    import sys

    from broker.access.selinux import kernel_has_selinuxfs

    without, with_ = tmp_path / "without", tmp_path / "with"
    without.write_text("nodev\tsysfs\nnodev\ttmpfs\n\text4\n")
    with_.write_text("nodev\tsysfs\nnodev\tselinuxfs\n\text4\n")
    assert not kernel_has_selinuxfs(str(without))
    assert kernel_has_selinuxfs(str(with_))
    assert kernel_has_selinuxfs(str(tmp_path / "absent"))  # unreadable: ask libselinux
    with open("/proc/filesystems", "rb") as f:
        here = b"\tselinuxfs\n" in f.read()
    code = ("import sys; from broker.access.selinux import selinux_enabled; e = selinux_enabled(); "
            "print(e, 'selinux' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    if not here:
        assert out == ["False", "False"]
    else:
        assert out[1] == "True"  # the kernel has selinuxfs: libselinux decides
