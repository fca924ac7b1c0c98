"""The real system.d policy files Debian packages ship (systemd, polkit, udisks2, bluez,
NetworkManager, avahi, ModemManager, wpa_supplicant, accountsservice, upower...), plus the
hand-written edge cases in tests/policy_corpus/, each included under the <policy> sections of
Debian's system.conf, through dbus-daemon and through sealbus: the same owns, sends and
receives, derived from the file's own rules, as root, two unprivileged users and the existing
users the file names (e.g. polkitd), must get the same allow/deny/error/noreply outcome, one
decision at a time. A config one broker refuses must be refused by the other too. A second
test per file compares what the sender of a denied message that expects no reply is told.

The corpus comes from scripts/policy-corpus.sh (packages downloaded and unpacked, not
installed); docs/policy-corpus.md records the agreement after a run over the whole corpus."""

import json
import os
import pwd
import subprocess
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from .policy_diff import (
    DBUS_DAEMON,
    SEALBUS_DAEMON,
    decisions_of,
    mismatches,
    outcomes,
    require_dbus_daemon,
)

ROOT = Path(__file__).resolve().parent.parent
CORPUS = Path(os.environ.get("SEALBUS_POLICY_CORPUS", "/var/cache/sealbus/policy-corpus"))
REPORT = ROOT / "docs" / "policy-corpus.md"
SYSTEM_CONF = Path("/usr/share/dbus-1/system.conf")
SERVICE_NAME = "SERVICE"  # stands for the service's unique name in the plan


def ensure_corpus() -> list[Path]:
    """The corpus files, fetched first if the directory is empty. This runs at collection, since the
    tests are parametrized by file name; an empty corpus then fails test_corpus_is_not_empty."""
    if not any(CORPUS.glob("*.conf")):
        try:
            subprocess.run(["sh", str(ROOT / "scripts" / "policy-corpus.sh")], timeout=600, check=False,
                           stdin=subprocess.DEVNULL)  # fmt: skip
        except subprocess.TimeoutExpired:
            pass
    return sorted(CORPUS.glob("*.conf"))


CORPUS_FILES = ensure_corpus()
# hand-written edge cases in the same form (contexts, match fields, unrequested replies, refusals)
EDGE_FILES = sorted((ROOT / "tests" / "policy_corpus").glob("*.conf"))
ALL_FILES = CORPUS_FILES + EDGE_FILES


def base_policy() -> str:
    """The <policy> sections of Debian's system.conf (default context: deny own and method calls,
    allow signals, requested replies and receives; root: Monitoring, Stats, systemd Activator)."""
    root = ET.parse(SYSTEM_CONF).getroot()
    return "".join(ET.tostring(p, encoding="unicode") for p in root.findall("policy"))


def _add(seq: list, item) -> None:
    if item not in seq:
        seq.append(item)


def plan(path: Path) -> dict:
    """What the service and the clients do, from the names, interfaces, members and paths the file's
    allow/deny rules mention: own every name; for every send rule, a call with the rule's
    destination (the service's unique name when it has none), path, interface and member ("Probe"
    when none), and the same call without an interface when the rule names a member; Introspect
    and Properties.GetAll on every name."""
    names, sends = [], []
    rules = [el for el in ET.parse(path).getroot().iter() if el.tag in ("allow", "deny")]
    for el in rules:
        a = el.attrib
        for attr in ("own", "send_destination", "receive_sender"):
            if a.get(attr) not in (None, "*"):
                _add(names, a[attr])
        for attr in ("own_prefix", "send_destination_prefix"):
            if a.get(attr):
                _add(names, a[attr])
                _add(names, a[attr] + ".Probe")
    for el in rules:
        a = el.attrib
        if not any(k.startswith("send_") for k in a):
            continue
        dests = [a[k] for k in ("send_destination",) if a.get(k) not in (None, "*")]
        if a.get("send_destination_prefix"):
            dests.append(a["send_destination_prefix"] + ".Probe")
        path_ = a.get("send_path", "/")
        iface = a.get("send_interface")
        member = a.get("send_member", "Probe")
        for dest in dests or [SERVICE_NAME]:
            _add(sends, [dest, path_, iface, member])
            if iface is not None and "send_member" in a:
                _add(sends, [dest, path_, None, member])
    for n in names:
        _add(sends, [n, "/", "org.freedesktop.DBus.Introspectable", "Introspect"])
        _add(sends, [n, "/", "org.freedesktop.DBus.Properties", "GetAll"])
    return {"names": names, "sends": sends}


# Runs as root (and as each existing user the file names): asks for every name (recording each
# outcome), then answers every method call, first sending the caller a unicast signal (so the
# caller's receive rules get a say as well). Messages that get no reply (signals, calls without
# reply, unrequested replies) are reported as "got KEY" lines; on "sync" on stdin it does a round
# trip to the bus driver (which queues behind anything already on its way) and prints "synced".
SERVICE = r"""
import json, select, signal, sys
from jeepney import DBusAddress, MessageType, message_bus, new_method_return, new_signal
from jeepney.low_level import HeaderFields, MessageFlag
from jeepney.io.blocking import open_dbus_connection
spec = json.loads(sys.argv[2])
signal.alarm(20)
c = open_dbus_connection(sys.argv[1])
own = {}
for n in spec["names"]:
    try:
        r = c.send_and_get_reply(message_bus.RequestName(n, 4), timeout=3)
    except TimeoutError:
        own[f"own {n}"] = "noreply"; continue
    if r.header.message_type == MessageType.method_return:
        own[f"own {n}"] = "allow"
    else:
        own[f"own {n}"] = "deny" if "AccessDenied" in str(r.header.fields) else "error"
signal.alarm(0)
print("ready", c.unique_name, json.dumps(own), flush=True)
echo = DBusAddress("/org/sealbus/Probe", interface="org.sealbus.Probe")
sync = None
while True:
    try:
        m = c.receive(timeout=0.05)
    except TimeoutError:
        if sync is None and select.select([sys.stdin], [], [], 0)[0]:
            if not sys.stdin.readline():
                sys.exit(0)
            sync = next(c.outgoing_serial)
            c.send(message_bus.GetId(), serial=sync)
        continue
    h, f = m.header, m.header.fields
    if sync is not None and f.get(HeaderFields.reply_serial) == sync:
        print("synced", flush=True)
        sync = None
    elif h.message_type == MessageType.method_call and not h.flags & MessageFlag.no_reply_expected:
        s = new_signal(echo, "Echo", "u", (h.serial,))
        s.header.fields[HeaderFields.destination] = f.get(HeaderFields.sender)
        c.send(s)
        intro = f.get(HeaderFields.member) == "Introspect"
        c.send(new_method_return(m, "s" if intro else "", ("<node/>",) if intro else ()))
    elif m.body and isinstance(m.body[0], str) and m.body[0].startswith("probe "):
        print("got", m.body[0][6:], flush=True)
"""

# Runs as root and as each user: every call of the plan; every call again without expecting a
# reply, and as a signal (when it has an interface); an unrequested reply to every name (each of
# these followed by a round trip to the bus driver, so an error the bus sends back is seen); then
# every RequestName (a name it gets is released at once, so the next user meets the same bus).
# Prints one JSON object of outcomes.
CLIENT = r"""
import json, signal, sys, time
from jeepney import DBusAddress, MessageType, message_bus, new_method_call, new_method_return, new_signal
from jeepney.low_level import HeaderFields, MessageFlag
from jeepney.io.blocking import open_dbus_connection
addr, spec, unique = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
out = {}

class Hung(Exception):
    pass

def hung(*a):
    raise Hung

signal.signal(signal.SIGALRM, hung)
signal.alarm(3)
try:
    c = open_dbus_connection(addr)
except Hung:
    print(json.dumps({"connect": "hung"})); sys.exit(0)
except Exception:
    print(json.dumps({"connect": "deny"})); sys.exit(0)
signal.alarm(0)
out["connect"] = "allow"
echoes = []

def verdict(r):
    if r.header.message_type == MessageType.method_return:
        return "allow"
    return "deny" if "AccessDenied" in str(r.header.fields) else "error"

def wait_for(serial, also=None):
    # the reply to serial (None if none within 3 s), and the first reply to `also` seen before it
    deadline, seen = time.monotonic() + 3, None
    while True:
        try:
            r = c.receive(timeout=max(deadline - time.monotonic(), 0.001))
        except TimeoutError:
            return None, seen
        f = r.header.fields
        if r.header.message_type == MessageType.signal and f.get(HeaderFields.member) == "Echo":
            echoes.append(r.body[0])
        elif f.get(HeaderFields.reply_serial) == serial:
            return r, seen
        elif also is not None and seen is None and f.get(HeaderFields.reply_serial) == also:
            seen = r

def ask(msg):
    serial = next(c.outgoing_serial)
    c.send(msg, serial=serial)
    r, _ = wait_for(serial)
    if r is None:
        return "noreply", None
    return verdict(r), (serial if verdict(r) == "allow" else None)

def fire(msg):
    # a message that gets no reply: did the bus send back AccessDenied before answering a ping?
    serial = next(c.outgoing_serial)
    c.send(msg, serial=serial)
    ping = next(c.outgoing_serial)
    c.send(message_bus.GetId(), serial=ping)
    r, seen = wait_for(ping, also=serial)
    if r is None:
        return "noreply"
    return "deny" if seen is not None and "AccessDenied" in str(seen.header.fields) else "no-denial"

signal.alarm(100)
try:
    answered = []
    for dest, path, iface, member in spec["sends"]:
        if dest == "SERVICE" and unique == "-":
            continue
        sig, body = ("s", ("",)) if member == "GetAll" else ("", ())
        to = DBusAddress(path, bus_name=unique if dest == "SERVICE" else dest, interface=iface)
        what = f"{dest} {path} {iface or '-'}.{member}"
        out[f"call {what}"], serial = ask(new_method_call(to, member, sig, body))
        if serial is not None:
            answered.append(serial)
        m = new_method_call(to, member, "s", ("probe noreply-call " + what,))
        m.header.flags |= MessageFlag.no_reply_expected
        out[f"noreply-call {what}"] = fire(m)
        if iface is not None:
            s = new_signal(DBusAddress(path, interface=iface), member, "s", ("probe signal " + what,))
            s.header.fields[HeaderFields.destination] = to.bus_name
            out[f"signal {what}"] = fire(s)
    for n in spec["names"]:
        parent = new_method_call(DBusAddress("/", bus_name=n), "Probe")
        parent.header.serial, parent.header.fields[HeaderFields.sender] = 4242, n
        out[f"unrequested-reply {n}"] = fire(new_method_return(parent, "s", ("probe unrequested-reply " + n,)))
    got = [s in echoes for s in answered]
    out["receive unicast signal"] = ("allow" if all(got) else "deny" if not any(got) else "mixed") if got \
        else "untested"
    for n in spec["names"]:
        out[f"own {n}"], _ = ask(message_bus.RequestName(n, 4))
        if out[f"own {n}"] == "allow":
            ask(message_bus.ReleaseName(n))
except Hung:
    out["client"] = "hung"
print(json.dumps(out))
"""


def named_users(path: Path) -> list:
    """The users this machine has among those the file's <policy user=...> sections name (not root)."""
    out = []
    for pol in ET.parse(path).getroot().iter("policy"):
        u = pol.get("user")
        if u and u not in ("*", "root", "0"):
            try:
                pw = pwd.getpwuid(int(u)) if u.isdigit() else pwd.getpwnam(u)
            except KeyError:
                continue
            if pw.pw_uid != 0 and pw not in out:
                out.append(pw)
    return out


def merge_deliveries(res: dict) -> dict:
    """Fold each user's "@service" report into its outcomes: for every message sent without a reply
    expected, "KEY @service" is "delivered" or "dropped" (what reached the service, not just what the
    sender was told)."""
    res = dict(res)
    for who in [k for k in res if k.endswith(" @service")]:
        lines = res.pop(who)
        got = {ln[4:] for ln in lines if ln.startswith("got ")}
        user = who[: -len(" @service")]
        try:
            outs = json.loads(res.get(user, ""))
        except ValueError:
            continue
        outs["service sync"] = " ".join(ln for ln in lines if ln.startswith("service:")) or "ok"
        for key in list(outs):
            if key.split(" ", 1)[0] in ("noreply-call", "signal", "unrequested-reply"):
                outs[f"{key} @service"] = "delivered" if key in got else "dropped"
        res[user] = json.dumps(outs)
    return res


def _ready(line: str):
    """The service's "ready UNIQUE {own outcomes}" line: (own outcomes, the unique name for the clients)."""
    parts = line.split(" ", 2)
    if len(parts) != 3 or parts[0] != "ready":
        return "not-ready", ("-",)
    return json.loads(parts[2]), (parts[1],)


def broker_outcomes(daemon_cmd, path: Path, test_users, tmp: Path) -> dict:
    """One broker's outcomes on one corpus file: services as root and as the existing users the file
    names (the owners it means, e.g. polkitd), clients as root, the test users and those users."""
    named = named_users(path)
    clients = [None, *test_users, *(u for u in named if u.pw_name not in {t.pw_name for t in test_users})]
    tmp.mkdir(parents=True, exist_ok=True)
    body = base_policy() + f"<include>{path}</include>"
    return merge_deliveries(outcomes(daemon_cmd, body, clients, tmp, CLIENT, SERVICE, (json.dumps(plan(path)),),
                                     ready=_ready, refused_ok=True, service_users=[None, *named],
                                     sync=True))  # fmt: skip


NOTICE_KINDS = ("noreply-call ", "signal ", "unrequested-reply ")


def is_notice(key) -> bool:
    """A decision key about what the *sender* of a message that expects no reply is told (AccessDenied or
    nothing), as opposed to what is delivered, answered or owned."""
    return isinstance(key, str) and key.startswith(NOTICE_KINDS) and not key.endswith(" @service")


class FileResult:
    """Both brokers' outcomes on one file, split into decisions and denial notices."""

    def __init__(self, theirs: dict, ours: dict):
        self.theirs, self.ours = theirs, ours
        a, b = decisions_of(theirs), decisions_of(ours)  # dbus-daemon's outcomes define the decisions
        notice = {k: is_notice(k[1]) for k in a}
        self.decisions = sum(not n for n in notice.values())
        self.notices = len(a) - self.decisions
        self.decisions_agree = sum(not notice[k] and b.get(k) == v for k, v in a.items())
        self.notices_agree = sum(notice[k] and b.get(k) == v for k, v in a.items())
        diff = mismatches(theirs, ours)
        self.decision_diff = [d for d in diff if not is_notice(d[1])]
        self.notice_diff = [d for d in diff if is_notice(d[1])]


_results: dict[str, FileResult] = {}


def file_result(path: Path, test_users, tmp_path) -> FileResult:
    """Run the file through both brokers once (side by side); both tests of the file read this."""
    if path.name not in _results:
        require_dbus_daemon()
        with ThreadPoolExecutor(2) as pool:
            jobs = [pool.submit(broker_outcomes, cmd, path, test_users, tmp_path / sub)
                    for cmd, sub in ((DBUS_DAEMON, "dbus-daemon"), (SEALBUS_DAEMON, "sealbus"))]  # fmt: skip
            theirs, ours = (j.result() for j in jobs)
        r = _results[path.name] = FileResult(theirs, ours)
        print(f"corpus {path.name}: {r.decisions_agree}/{r.decisions} decisions agree, "
              f"{r.notices_agree}/{r.notices} denial notices agree")  # fmt: skip
    return _results[path.name]


@pytest.fixture(scope="module", autouse=True)
def report():
    """After the corpus: the summary line, and (after a run over the whole corpus) docs/policy-corpus.md."""
    yield
    if not _results:
        return
    rs = _results.values()
    dec, dec_ok = sum(r.decisions for r in rs), sum(r.decisions_agree for r in rs)
    notes, notes_ok = sum(r.notices for r in rs), sum(r.notices_agree for r in rs)
    summary = (f"{len(_results)} files, {dec_ok}/{dec} decisions agree, "
               f"{notes_ok}/{notes} denial notices agree")  # fmt: skip
    print(f"\npolicy corpus: {summary}")
    if set(_results) != {p.name for p in ALL_FILES}:
        return  # a partial run (-k) does not rewrite the record
    lines = ["# Policy corpus: sealbus vs dbus-daemon", "",
             "Written by `tests/test_policy_corpus.py` (corpus from `scripts/policy-corpus.sh`: the system.d files "
             "of avahi-daemon, bluez, udisks2, network-manager, upower, accountsservice, modemmanager and "
             "wpasupplicant, downloaded and unpacked, not installed, plus those installed here: systemd, "
             "polkit...). Each file is included under the `<policy>` sections of Debian's system.conf and run "
             "through dbus-daemon and through sealbus.", "",
             "A service asks for every name the file mentions, as root and then as each existing user the file "
             "names (polkitd, systemd-timesync). Then root, sealbus-test1, sealbus-test2 and those users each: "
             "call, for every send rule, its destination (the service's unique name when the rule has none) with "
             "the rule's path, interface and member (\"Probe\" when none), once more without interface when it "
             "names a member; call Introspect and Properties.GetAll on every name; send each of these calls again "
             "without expecting a reply, and as a unicast signal, and an unrequested method return to every name; "
             "check that the service's unicast signal reached them; and ask for every name.", "",
             "*Decisions*: connect, every call's outcome (allow / deny = AccessDenied / error / noreply), every "
             "RequestName, the receive of the service's signal, whether each no-reply message reached the "
             "service, a refused config. *Denial notices*: whether the sender of a message that expects no "
             "reply (no-reply call, unicast signal, unrequested reply) was sent AccessDenied.", "",
             f"**{summary}.**", "",
             "| file | decisions | agree | denial notices | agree |", "|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {f} | {r.decisions} | {r.decisions_agree} | {r.notices} | {r.notices_agree} |"
              for f, r in sorted(_results.items())]  # fmt: skip
    groups: dict[tuple, list] = {}  # (kind of action, dbus-daemon, sealbus) -> [(file, who, action)]
    for f, r in sorted(_results.items()):
        for who, key, t, o in r.decision_diff + r.notice_diff:
            groups.setdefault((str(key).split(" ", 1)[0], t, o), []).append((f, who, key))
    if groups:
        lines += ["", "## Outcomes that differ", "", "| action | dbus-daemon | sealbus | count | files | first case |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for (kind, t, o), cases in sorted(groups.items()):
            f, who, key = cases[0]
            lines.append(f"| {kind} | {t} | {o} | {len(cases)} | {len({c[0] for c in cases})} | "
                         f"{f}, {who}: `{key}` |")  # fmt: skip
    REPORT.write_text("\n".join(lines) + "\n")


def test_corpus_is_not_empty():
    assert len(CORPUS_FILES) >= 10, (
        f"only {len(CORPUS_FILES)} policy files in {CORPUS}: scripts/policy-corpus.sh could not fetch the "
        "corpus (see its messages; it needs apt-get download and dpkg-deb)")  # fmt: skip


def _show(diff) -> str:
    return "(who, action, dbus-daemon, sealbus):\n" + "\n".join(map(str, diff))


@pytest.mark.root
@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: p.name)
def test_real_policy_file_decides_like_dbus_daemon(path, test_users, tmp_path):
    """What is delivered, answered, owned and refused: identical, decision by decision."""
    r = file_result(path, test_users, tmp_path)
    # the comparison means something only if dbus-daemon ran the file (or, for the refused edge cases, refused it)
    assert (r.theirs.get("bus") == "refused") == path.name.startswith("edge-refused-"), r.theirs
    assert r.decisions >= 3 or path.name.startswith("edge-refused-"), r.theirs
    assert not r.decision_diff, "decisions that differ " + _show(r.decision_diff)


@pytest.mark.root
@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: p.name)
def test_real_policy_file_reports_denials_like_dbus_daemon(path, test_users, tmp_path):
    """dbus-daemon answers a denied no-reply call, unicast signal or unrequested reply with AccessDenied
    to its sender; sealbus must tell the sender the same."""
    r = file_result(path, test_users, tmp_path)
    assert not r.notice_diff, "denial notices that differ " + _show(r.notice_diff)
