"""Service files, service directories and the catalogue of activatable names (broker/activation/,
broker/access/servicedirs.py): every rule of dbus-daemon's desktop-file reader and of its activation
entries, on real files (dbus-daemon's own test data where Debian's dbus-tests package installs it)."""

import logging
import os
from pathlib import Path

import pytest

from broker.access.config import parse_config_string
from broker.access.servicedirs import (
    standard_session_servicedirs,
    standard_system_servicedirs,
)
from broker.activation.catalog import (
    MAX_FILES_PER_DIR,
    ServiceCatalog,
    catalog_from_json,
    catalog_to_json,
    load_catalog,
    service_file_names,
)
from broker.activation.service_file import (
    MAX_FILE_BYTES,
    ServiceFile,
    ServiceFileError,
    parse_groups,
    parse_service_file,
    read_service_file,
)
from broker.bus.settings import ServiceDir

DBUS_DATA = Path("/usr/lib/dbus-1.0/installed-tests/dbus/data")
needs_dbus_data = pytest.mark.skipif(not DBUS_DATA.is_dir(), reason="Debian's dbus-tests package is not installed")

GOOD = "[D-BUS Service]\nName=org.example.Foo\nExec=/usr/bin/foo --bar\n"


def parse(text: str, path: str = "/d/org.example.Foo.service", system_bus: bool = False) -> ServiceFile:
    return parse_service_file(text, path, system_bus=system_bus)


def bad(text: str, why: str, system_bus: bool = False, path: str = "/d/org.example.Foo.service") -> None:
    with pytest.raises(ServiceFileError, match=why):
        parse(text, path, system_bus)


# -- the desktop-file syntax --------------------------------------------------


def test_minimal_session_file():
    svc = parse(GOOD)
    assert svc == ServiceFile("org.example.Foo", "/usr/bin/foo --bar", None, None, "/d/org.example.Foo.service")


def test_all_keys_and_ignored_ones():
    svc = parse(
        "# comment\n\n[D-BUS Service]\nName=org.example.Foo\nExec=/bin/false\nUser=root\n"
        "SystemdService=dbus-org.example.Foo.service\nAssumedAppArmorLabel=/x//y\nX-Unknown=ignored\n"
        "[Other Group]\nName=org.example.Other\nExec=nope\n"
    )
    assert (svc.name, svc.exec, svc.user) == ("org.example.Foo", "/bin/false", "root")
    assert svc.systemd_service == "dbus-org.example.Foo.service"
    assert svc.assumed_apparmor_label == "/x//y"


def test_spaces_around_equals_and_trailing_value_kept():
    svc = parse("[D-BUS Service]\nName  =   org.example.Foo\nExec= a b  \n")
    assert svc.name == "org.example.Foo"
    assert svc.exec == "a b  "  # only the spaces after '=' go, as in dbus-daemon


def test_line_ends_crlf_and_cr():
    assert parse(GOOD.replace("\n", "\r\n")).exec == "/usr/bin/foo --bar"
    assert parse(GOOD.replace("\n", "\r")).exec == "/usr/bin/foo --bar"


def test_escapes():
    svc = parse("[D-BUS Service]\nName=org.example.Foo\nExec=a\\sb\\tc\\nd\\re\\\\f\n")
    assert svc.exec == "a b\tc\nd\re\\f"


@pytest.mark.parametrize("value", ["a\\x", "a\\", 'a\\"', "a\x00b"])
def test_bad_escapes_and_nul_are_errors(value):
    bad(f"[D-BUS Service]\nName=org.example.Foo\nExec={value}\n", "escape|backslash|NUL")


def test_first_key_and_first_group_win():
    svc = parse(
        "[D-BUS Service]\nName=org.example.Foo\nExec=first\nExec=second\n"
        "[D-BUS Service]\nName=org.example.Bar\nUser=late\n"
    )
    assert (svc.name, svc.exec, svc.user) == ("org.example.Foo", "first", None)


def test_localised_keys_are_ignored_whatever_follows():
    svc = parse("[D-BUS Service]\nName=org.example.Foo\nExec[de]=anything at all \\q\nExec=real\n")
    assert svc.exec == "real"


@pytest.mark.parametrize(
    "text, why",
    [
        ("Name=org.example.Foo\n[D-BUS Service]\n", "before any"),
        ("[D-BUS Service\nName=org.example.Foo\n", "group header"),
        ("[]\n", "group header"),
        ("[D-BUS Service] \n", "group header"),
        ("[D-BUS\x01Service]\n", "invalid characters in group"),
        ("[D-BUS [Service]\n", "invalid characters in group"),
        ("[D-BUS Service]\n=value\n", "empty key"),
        ("[D-BUS Service]\n  Name=org.example.Foo\n", "empty key"),
        ("[D-BUS Service]\nName\n", "no '='"),
        ("[D-BUS Service]\nName  \n", "no '='"),
        ("[D-BUS Service]\nNa_me=x\n", "invalid characters in key"),
        ("[D-BUS Service]\nName.x=x\n", "invalid characters in key"),
        ("[D-BUS Service]\nName\t=x\n", "invalid characters in key"),
    ],
)
def test_malformed_lines_are_errors(text, why):
    bad(text, why)


def test_blank_lines_may_hold_whitespace_and_form_feeds():
    groups = parse_groups(" \t\f\r\n[G]\n\t \nk=v\n# c\n", "f")
    assert groups == {"G": {"k": "v"}}


def test_non_ascii_group_name_is_an_error():
    bad("[D-BUS Servicé]\nName=org.example.Foo\nExec=x\n", "invalid characters in group")


# -- what the [D-BUS Service] group must hold ---------------------------------


def test_no_service_group():
    bad("[Desktop Entry]\nName=org.example.Foo\nExec=x\n", r"no \[D-BUS Service\] group")


def test_name_and_exec_required():
    bad("[D-BUS Service]\nExec=x\n", "no Name=")
    bad("[D-BUS Service]\nName=org.example.Foo\n", "no Exec=")
    # as dbus-daemon 1.14: even a systemd-activated file needs Exec= (they say Exec=/bin/false)
    bad("[D-BUS Service]\nName=org.example.Foo\nSystemdService=foo.service\n", "no Exec=")


@pytest.mark.parametrize(
    "name", ["", "noDots", ":1.5", "org..example", "org.example.1x", "a" * 254 + ".b", "org.ex ample"]
)
def test_name_must_be_a_well_known_name(name):
    bad(f"[D-BUS Service]\nName={name}\nExec=x\n", "not a valid well-known bus name")


def test_system_bus_needs_user_and_the_canonical_file_name():
    text = GOOD + "User=root\n"
    assert parse(text, system_bus=True).user == "root"
    bad(GOOD, "needs User=", system_bus=True)
    bad(text, "must be named org.example.Foo.service", system_bus=True, path="/d/foo.service")
    assert parse(text, "/d/foo.service").name == "org.example.Foo"  # the session bus does not mind


def test_size_bound_and_utf8(tmp_path):
    big = tmp_path / "org.example.Foo.service"
    big.write_text(GOOD + "#" * MAX_FILE_BYTES + "\n")
    with pytest.raises(ServiceFileError, match="larger than"):
        read_service_file(str(big), system_bus=False)
    with pytest.raises(ServiceFileError, match="larger than"):
        parse(GOOD + "#" * MAX_FILE_BYTES)
    latin = tmp_path / "latin.service"
    latin.write_bytes(GOOD.encode() + b"X-Comment=caf\xe9\n")
    with pytest.raises(ServiceFileError, match="UTF-8"):
        read_service_file(str(latin), system_bus=False)
    with pytest.raises(ServiceFileError, match="cannot read"):
        read_service_file(str(tmp_path / "missing.service"), system_bus=False)


@needs_dbus_data
def test_dbus_daemons_invalid_system_service_files():
    """dbus-daemon's launch helper refuses these three (no Exec=, no Name=, no User=)."""
    d = DBUS_DATA / "invalid-service-files-system"
    expected = {"TestSuiteNoExec": "no Exec=", "TestSuiteNoService": "no Name=", "TestSuiteNoUser": "needs User="}
    for short, why in expected.items():
        path = d / f"org.freedesktop.DBus.{short}.service"
        with pytest.raises(ServiceFileError, match=why):
            read_service_file(str(path), system_bus=True)


@needs_dbus_data
@pytest.mark.parametrize("sub, system_bus", [("valid-service-files", False), ("valid-service-files-system", True),
                                             ("systemd-activation", False)])  # fmt: skip
def test_dbus_daemons_valid_service_files(sub, system_bus):
    files = sorted((DBUS_DATA / sub).glob("*.service"))
    assert files
    for path in files:
        svc = read_service_file(str(path), system_bus=system_bus)
        assert path.name == svc.name + ".service"
        assert svc.exec


# -- directories ----------------------------------------------------------------


def test_standard_system_servicedirs_are_dbus_daemon_1_14s():
    assert [d.path for d in standard_system_servicedirs()] == [
        "/usr/local/share/dbus-1/system-services",
        "/usr/share/dbus-1/system-services",
        "/usr/share/dbus-1/system-services",
        "/lib/dbus-1/system-services",
    ]


def test_standard_session_servicedirs_from_the_environment():
    env = {"XDG_RUNTIME_DIR": "/run/user/7", "XDG_DATA_HOME": "/h/data", "XDG_DATA_DIRS": "/a:/b", "HOME": "/h"}
    dirs = standard_session_servicedirs(env)
    assert dirs[0] == ServiceDir("/run/user/7/dbus-1/services", strict_naming=True, watch=False)
    assert [d.path for d in dirs[1:]] == ["/h/data/dbus-1/services", "/a/dbus-1/services", "/b/dbus-1/services",
                                          "/usr/share/dbus-1/services"]  # fmt: skip
    defaults = [d.path for d in standard_session_servicedirs({"HOME": "/h"})]
    assert defaults == ["/h/.local/share/dbus-1/services", "/usr/local/share/dbus-1/services",
                        "/usr/share/dbus-1/services", "/usr/share/dbus-1/services"]  # fmt: skip


def test_config_keeps_servicedirs_in_order_each_once(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_DATA_DIRS", "/usr/share")
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    cfg = parse_config_string(
        "<busconfig><servicedir>/first</servicedir><standard_session_servicedirs/>"
        "<servicedir>/usr/share/dbus-1/services</servicedir><servicedir>rel</servicedir>"
        "<standard_system_servicedirs/></busconfig>",
        filename=str(tmp_path / "bus.conf"),
    )
    assert [d.path for d in cfg.servicedirs] == [
        "/first", str(tmp_path / "home/dbus-1/services"), "/usr/share/dbus-1/services", str(tmp_path / "rel"),
        "/usr/local/share/dbus-1/system-services", "/usr/share/dbus-1/system-services", "/lib/dbus-1/system-services",
    ]  # fmt: skip


def test_settings_carry_the_servicedirs(tmp_path):
    from broker.access.config_settings import settings_from_file

    conf = tmp_path / "bus.conf"
    conf.write_text("<busconfig><listen>unix:tmpdir=/tmp</listen><servicedir>/x</servicedir></busconfig>")
    settings, _ = settings_from_file(str(conf))
    assert settings.servicedirs == [ServiceDir("/x")]


# -- the catalogue ----------------------------------------------------------------


def write(d: Path, fname: str, text: str) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    p = d / fname
    p.write_text(text)
    return p


def svc_text(name: str, exec_: str = "/bin/true", extra: str = "") -> str:
    return f"[D-BUS Service]\nName={name}\nExec={exec_}\n{extra}"


def test_catalog_first_directory_wins_invalid_skipped_and_logged(tmp_path, caplog):
    a, b = tmp_path / "a", tmp_path / "b"
    write(a, "org.example.One.service", svc_text("org.example.One", "/a/one"))
    write(b, "org.example.One.service", svc_text("org.example.One", "/b/one"))
    write(b, "org.example.Two.service", svc_text("org.example.Two", "/b/two"))
    broken = write(b, "broken.service", "[D-BUS Service]\nName=org.example.Broken\n")
    write(b, "not-a-service-file.txt", svc_text("org.example.Txt"))
    with caplog.at_level(logging.INFO, logger="sealbus.activation"):
        cat = load_catalog([str(a), str(tmp_path / "missing"), str(b)], system_bus=False)
    assert cat.names() == ["org.example.One", "org.example.Two"]
    assert cat.get("org.example.One").exec == "/a/one"
    assert cat.get("org.example.Nope") is None
    assert str(broken) in caplog.text and "no Exec=" in caplog.text
    assert "already provided by" in caplog.text


def test_catalog_unreadable_directory_is_skipped(tmp_path):
    d = tmp_path / "locked"
    write(d, "org.example.One.service", svc_text("org.example.One"))
    d.chmod(0)
    tmp_path.chmod(0o755)
    pid = os.fork()
    if pid == 0:  # the check runs as nobody, who cannot read the directory (root could)
        code = 1
        try:
            if os.geteuid() == 0:
                os.setgroups([])
                os.setresgid(65534, 65534, 65534)
                os.setresuid(65534, 65534, 65534)
            code = 0 if load_catalog([str(d)], system_bus=False).names() == [] else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    d.chmod(0o755)
    assert os.waitstatus_to_exitcode(status) == 0
    assert load_catalog([str(d)], system_bus=False).names() == ["org.example.One"]


def test_catalog_strict_directory_wants_canonical_names(tmp_path, caplog):
    d = tmp_path / "t"
    write(d, "wrong.service", svc_text("org.example.Wrong"))
    write(d, "org.example.Right.service", svc_text("org.example.Right"))
    cat = load_catalog([ServiceDir(str(d), strict_naming=True)], system_bus=False)
    assert cat.names() == ["org.example.Right"]
    assert "should be named org.example.Wrong.service" in caplog.text
    assert load_catalog([str(d)], system_bus=False).names() == ["org.example.Right", "org.example.Wrong"]


def test_catalog_system_bus_rules(tmp_path):
    d = tmp_path / "sys"
    write(d, "org.example.Ok.service", svc_text("org.example.Ok", extra="User=root\n"))
    write(d, "org.example.NoUser.service", svc_text("org.example.NoUser"))
    write(d, "misnamed.service", svc_text("org.example.Misnamed", extra="User=root\n"))
    assert load_catalog([str(d)], system_bus=True).names() == ["org.example.Ok"]


def test_catalog_bounds_files_per_directory(tmp_path, caplog):
    d = tmp_path / "flood"
    d.mkdir()
    for i in range(MAX_FILES_PER_DIR + 5):
        (d / f"f{i:06d}.service").touch()
    assert len(service_file_names(str(d))) == MAX_FILES_PER_DIR
    cat = load_catalog([str(d)], system_bus=False)  # every one invalid (empty): logged, none kept
    assert len(cat) == 0
    assert "rest are ignored" in caplog.text


def test_catalog_json_round_trip_and_malformed(tmp_path):
    d = tmp_path / "a"
    write(d, "org.example.One.service", svc_text("org.example.One", extra="User=u\nSystemdService=one.service\n"))
    cat = load_catalog([ServiceDir(str(d), strict_naming=True, watch=False)], system_bus=False)
    again = catalog_from_json(catalog_to_json(cat))
    assert again.names() == cat.names() and again.dirs == cat.dirs
    assert again.get("org.example.One") == cat.get("org.example.One")
    for junk in ({}, {"dirs": [], "services": [[1, 2, 3, 4, 5, 6]]}, {"dirs": [[1]], "services": []}):
        with pytest.raises(ValueError):
            catalog_from_json(junk)


def test_empty_catalog():
    cat = ServiceCatalog()
    assert cat.names() == [] and cat.get("org.example.X") is None and len(cat) == 0


def test_transient_session_dir_is_created_only_in_a_private_runtime_dir(tmp_path, monkeypatch):
    """As dbus-daemon: <standard_session_servicedirs/> makes $XDG_RUNTIME_DIR/dbus-1/services (systemd and the
    reference tests drop transient services there), but only where the runtime dir is this user's alone."""
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    cfg = parse_config_string("<busconfig><standard_session_servicedirs/></busconfig>")
    assert cfg.servicedirs[0] == ServiceDir(str(runtime / "dbus-1/services"), strict_naming=True, watch=False)
    assert (runtime / "dbus-1/services").is_dir()
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(shared))
    cfg = parse_config_string("<busconfig><standard_session_servicedirs/></busconfig>")
    assert not (shared / "dbus-1").exists()
    assert all(not d.path.startswith(str(shared)) for d in cfg.servicedirs)


# -- the oracle: dbus-daemon reading the same directories ------------------------------------------------


HOSTILE = {
    "org.example.Good.service": "[D-BUS Service]\nName=org.example.Good\nExec=/bin/true\n",
    "misnamed.service": "[D-BUS Service]\nName=org.example.Misnamed\nExec=/bin/true\n",
    "org.example.NoExec.service": "[D-BUS Service]\nName=org.example.NoExec\n",
    "org.example.BadEscape.service": "[D-BUS Service]\nName=org.example.BadEscape\nExec=/bin/true \\q\n",
    "org.example.Escapes.service": "[D-BUS Service]\nName=org.example.Escapes\nExec=/bin/echo\\sa\\tb\\\\\n",
    "org.example.Localised.service": "[D-BUS Service]\nName=org.example.Localised\nExec[fr]=x \\q\nExec=/bin/true\n",
    "org.example.EmptyHeader.service": "[]\nName=org.example.EmptyHeader\nExec=/bin/true\n",
    "org.example.BeforeGroup.service": "Name=org.example.BeforeGroup\n[D-BUS Service]\nExec=/bin/true\n",
    "org.example.OtherGroup.service": "[Other]\nName=org.example.OtherGroup\nExec=/bin/true\n",
    "org.example.NoEquals.service": "[D-BUS Service]\nName=org.example.NoEquals\nExec /bin/true\n",
    "org.example.KeyChars.service": "[D-BUS Service]\nName=org.example.KeyChars\nExec=/bin/true\nX_y=1\n",
    "org.example.Crlf.service": "[D-BUS Service]\r\nName=org.example.Crlf\r\nExec=/bin/true\r\n",
    "org.example.Second.service": "[D-BUS Service]\nName=org.example.Good\nExec=/bin/false\n",
    "org.example.Txt.conf": "[D-BUS Service]\nName=org.example.Txt\nExec=/bin/true\n",
    "org.example.Big.service": "[D-BUS Service]\nName=org.example.Big\nExec=/bin/true\n#" + "x" * MAX_FILE_BYTES + "\n",
}


def _activatable(address: str) -> set[str]:
    from jeepney import message_bus, new_method_call
    from jeepney.io.blocking import open_dbus_connection

    with open_dbus_connection(address) as c:
        return set(c.send_and_get_reply(new_method_call(message_bus, "ListActivatableNames"), timeout=30).body[0])


@needs_dbus_data
@pytest.mark.skipif(not os.path.exists("/usr/bin/dbus-daemon"), reason="no dbus-daemon to compare with")
def test_list_activatable_names_matches_dbus_daemon(tmp_path):
    """The same service directories (dbus-daemon's own test data, and hostile files of every kind the
    desktop-file rules refuse or accept) give the same ListActivatableNames on dbus-daemon and on sealbus."""
    import subprocess

    from .conftest import VENV_BIN, terminate

    hostile = tmp_path / "hostile"
    hostile.mkdir()
    for fname, text in HOSTILE.items():
        (hostile / fname).write_text(text)
    dirs = [hostile, DBUS_DATA / "valid-service-files", DBUS_DATA / "systemd-activation", tmp_path / "missing"]
    conf = tmp_path / "bus.conf"
    conf.write_text(
        "<busconfig><type>session</type><listen>unix:tmpdir=/tmp</listen>"
        + "".join(f"<servicedir>{d}</servicedir>" for d in dirs)
        + '<policy context="default"><allow send_destination="*" eavesdrop="true"/><allow eavesdrop="true"/>'
        '<allow own="*"/></policy></busconfig>'
    )
    seen = {}
    for daemon in ("/usr/bin/dbus-daemon", os.path.join(VENV_BIN, "sealbus-dbus-daemon")):
        proc = subprocess.Popen([daemon, f"--config-file={conf}", "--nofork", "--print-address=1"],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
        try:
            seen[daemon] = _activatable(proc.stdout.readline().strip())
        finally:
            terminate(proc, timeout=15)
    reference, ours = seen.values()
    assert "org.example.Good" in reference and "com.example.SystemdActivatable1" in reference
    assert ours == reference, (sorted(ours - reference), sorted(reference - ours))
