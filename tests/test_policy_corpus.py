"""The real system.d policy files Debian packages ship (systemd, polkit, udisks2, bluez,
NetworkManager, avahi, ModemManager, wpa_supplicant, accountsservice, upower...), each
under Debian's system.conf defaults, through dbus-daemon and through sealbus: the same
owns and sends, derived from the file's own rules, as root and two unprivileged users,
must get the same allow/deny. The corpus comes from scripts/policy-corpus.sh (the
packages are downloaded, not installed); docs/policy-corpus.md records the agreement."""

import json
import os
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from .policy_diff import CLIENT_PRELUDE, DBUS_DAEMON, SEALBUS_DAEMON, compare, outcomes, require_dbus_daemon

ROOT = Path(__file__).resolve().parent.parent
CORPUS = Path(os.environ.get("SEALBUS_POLICY_CORPUS", "/var/cache/sealbus/policy-corpus"))
REPORT = ROOT / "docs" / "policy-corpus.md"
MAX_SENDS = 30


def corpus_files() -> list[Path]:
    if not any(CORPUS.glob("*.conf")):
        subprocess.run([str(ROOT / "scripts" / "policy-corpus.sh")], check=False)
    return sorted(CORPUS.glob("*.conf"))


def base_policy() -> str:
    """Debian's system.conf default context (deny own, deny method calls, allow replies/signals/receives)."""
    tree = ET.parse("/usr/share/dbus-1/system.conf")
    for pol in tree.getroot().iter("policy"):
        if pol.get("context") == "default":
            return ET.tostring(pol, encoding="unicode")
    raise AssertionError("no default policy in system.conf")


def actions(path: Path) -> dict:
    """Names to own and calls to make, from the file's own rules."""
    names, sends = [], []
    for el in ET.parse(path).getroot().iter():
        if el.tag not in ("allow", "deny"):
            continue
        a = el.attrib
        for n in (a.get("own"), a.get("send_destination")):
            if n and n != "*" and n not in names:
                names.append(n)
        if a.get("own_prefix"):
            for n in (a["own_prefix"], a["own_prefix"] + ".Probe"):
                if n not in names:
                    names.append(n)
        dest = a.get("send_destination")
        if dest and dest != "*":
            call = [dest, a.get("send_path", "/"), a.get("send_interface"), a.get("send_member", "Probe")]
            if call not in sends:
                sends.append(call)
            for iface, member in (("org.freedesktop.DBus.Introspectable", "Introspect"),
                                  ("org.freedesktop.DBus.Properties", "GetAll")):  # fmt: skip
                probe = [dest, "/", iface, member]
                if probe not in sends:
                    sends.append(probe)
    return {"names": names, "sends": sends[:MAX_SENDS]}


SERVICE = r"""
import json, signal, sys
from jeepney import MessageType, message_bus, new_method_return
from jeepney.io.blocking import open_dbus_connection
spec = json.loads(sys.argv[2])
signal.alarm(20)
c = open_dbus_connection(sys.argv[1])
got = []
for n in spec["names"]:
    r = c.send_and_get_reply(message_bus.RequestName(n, 4), timeout=5)
    got.append("1" if r.header.message_type == MessageType.method_return and r.body[0] == 1 else "0")
signal.alarm(0)
print("ready", "".join(got), flush=True)
while True:
    m = c.receive()
    if m.header.message_type == MessageType.method_call:
        c.send(new_method_return(m, "s" if m.header.fields.get(3) == "Introspect" else "",
                                 ("<node/>",) if m.header.fields.get(3) == "Introspect" else ()))
"""

CLIENT = CLIENT_PRELUDE + r"""
import json
spec = json.loads(sys.argv[2])
for dest, path, iface, member in spec["sends"]:
    sig, body = ("s", ("",)) if member == "GetAll" else ("", ())
    out.append(f"send {dest}:{iface}.{member}:" + ask(new_method_call(
        DBusAddress(path, bus_name=dest, interface=iface), member, sig, body)))
for n in spec["names"]:
    out.append(f"own {n}:" + ask(message_bus.RequestName(n, 4)))
print(" ".join(out))
"""

_results: dict[str, tuple[int, int]] = {}


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    if not _results:
        return
    total = sum(d for d, _ in _results.values())
    agree = sum(a for _, a in _results.values())
    lines = ["# Policy corpus: sealbus vs dbus-daemon", "",
             "Written by `tests/test_policy_corpus.py` (corpus from `scripts/policy-corpus.sh`). Each file runs "
             "under Debian's system.conf default policy; the owns and sends come from the file's own rules "
             "(plus Introspect and Properties.GetAll on each destination), as root and two unprivileged users, "
             "through dbus-daemon and through sealbus. A decision is one allow/deny/error/noreply outcome.", "",
             f"**{len(_results)} files, {agree}/{total} decisions agree.**", "",
             "| file | decisions | agree |", "|---|---|---|"]  # fmt: skip
    lines += [f"| {f} | {d} | {a} |" for f, (d, a) in sorted(_results.items())]
    REPORT.write_text("\n".join(lines) + "\n")


@pytest.mark.timeout(600)
@pytest.mark.parametrize("path", corpus_files(), ids=lambda p: p.name)
def test_real_policy_file_decides_like_dbus_daemon(path, test_users, tmp_path):
    require_dbus_daemon()
    spec = json.dumps(actions(path))
    body = base_policy() + f"<include>{path}</include>"
    users = [None, *test_users]
    theirs = outcomes(DBUS_DAEMON, body, users, tmp_path, CLIENT, SERVICE, (spec,))
    ours = outcomes(SEALBUS_DAEMON, body, users, tmp_path, CLIENT, SERVICE, (spec,))
    decisions, agree = compare(theirs, ours)
    _results[path.name] = (decisions, agree)
    print(f"corpus {path.name}: {agree}/{decisions} decisions agree")
    assert ours == theirs


def test_corpus_is_not_empty():
    files = corpus_files()
    assert len(files) >= 10, f"only {len(files)} policy files in {CORPUS}: run scripts/policy-corpus.sh"
