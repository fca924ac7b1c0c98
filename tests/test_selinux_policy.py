"""The SELinux module builds cleanly, links into the distribution policy, keeps its
neverallow invariants, and the audit answers match the expected set.

No kernel needed: everything runs on a policy linked in a temporary store root."""

import json
import shutil
import subprocess

import pytest

from broker.access import selinux_audit

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(
        not selinux_audit.DEVEL_MAKEFILE.exists() or shutil.which("semodule") is None,
        reason="selinux-policy-dev / semodule not installed (scripts/setup.sh installs them)",
    ),
]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(make output, binary policy path, setools policy) built once for the module."""
    from setools import SELinuxPolicy

    work = tmp_path_factory.mktemp("selinux")
    mod = work / "module"
    mod.mkdir()
    for name in ("sealbus.te", "sealbus.if", "sealbus.fc"):
        shutil.copy2(selinux_audit.POLICY_SRC / name, mod / name)
    proc = subprocess.run(
        ["make", "-f", str(selinux_audit.DEVEL_MAKEFILE), "sealbus.pp"], cwd=mod, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    policy_path = selinux_audit.link_policy(mod / "sealbus.pp", work / "root")
    return proc.stdout + proc.stderr, policy_path, SELinuxPolicy(str(policy_path))


@pytest.fixture(scope="module")
def answers(built):
    _, policy_path, _ = built
    return selinux_audit.audit(policy_path)


def test_module_builds_without_warnings(built):
    output, _, _ = built
    noisy = [line for line in output.splitlines() if "warning" in line.lower() or "error" in line.lower()]
    assert noisy == [], output


def test_module_is_linked_with_distribution_policy(built):
    _, _, policy = built
    types = {str(t) for t in policy.types()}
    assert {"sealbus_t", "sealbus_launch_t", "sealbus_fs_t", "sealbus_var_run_t", "init_t", "unconfined_t"} <= types
    assert "sealbus_unconfined_use_payload_fs" in {str(b) for b in policy.bools()}


def test_audit_matches_expected(answers):
    expected = json.loads(selinux_audit.EXPECTED.read_text())
    assert selinux_audit.compare(answers, expected) == {}


def test_audit_answers_hold_the_invariants(answers):
    assert answers["transition_into_broker"] == ["sealbus_launch_t"]
    connect = set(answers["connect_bus_socket"])
    assert "sealbus_demo_client_t" in connect
    assert "sealbus_demo_denied_t" not in connect
    assert "sealbus_demo_stranger_t" in connect  # connects; the bus's dbus-class checks stop it
    assert "sealbus_demo_stranger_t" not in {o.split(" ")[0] for o in answers["open_payload_fs"]}
    writers = set(answers["write_payload_fs"])
    assert "sealbus_t" not in writers  # the broker never writes the payload fs
    assert "sealbus_demo_service_t" not in writers  # read-only interface
    assert all(w.endswith("]") for w in writers - {"sealbus_demo_client_t"})  # others only via the boolean
    assert "sealbus_demo_denied_t" not in {o.split(" ")[0] for o in answers["open_payload_fs"]}
    assert "sealbus_t" not in {f.split(" ")[0] for f in answers["payload_flows_to_network"]}


def test_real_clients_may_use_the_bus(answers):
    """Unconfined users, systemd (init_t) and init scripts talk to the bus driver and own names
    (issue 20, item 1); the distribution's dbus-daemon clients only with the tunable on; a domain
    without the interfaces never."""
    for question in ("connect_bus_socket", "send_msg_bus", "acquire_svc_bus"):
        got = set(answers[question])
        assert {"unconfined_t", "init_t", "initrc_t"} <= got, question
        assert "NetworkManager_t [sealbus_serve_dbus_clients]" in got, question  # a dbusd_system_bus_client
        assert "NetworkManager_t" not in got, question  # ... only with the tunable on
        assert not {d for d in got if d.startswith("sealbus_demo_denied_t")}, question
    assert "sealbus_demo_stranger_t" in answers["send_msg_bus"]  # talks to the driver
    assert "sealbus_demo_stranger_t" not in answers["acquire_svc_bus"]  # owns nothing


def test_bus_client_interfaces(built):
    """sealbus_system_bus_client(): send_msg both ways between the client and the bus;
    sealbus_unconfined(): message every client of the bus."""
    _, _, policy = built
    assert "send_msg" in _allowed(policy, "sealbus_t", "unconfined_t", "dbus")
    assert "send_msg" in _allowed(policy, "init_t", "init_t", "dbus")
    assert {"send_msg", "acquire_svc"} <= _allowed(policy, "init_t", "sealbus_t", "dbus")
    assert "send_msg" in _allowed(policy, "unconfined_t", "init_t", "dbus")


def test_audit_detects_a_difference(built, tmp_path, capsys):
    """A changed answer must fail: drop one expected domain and one answer gains an 'unexpected'."""
    _, policy_path, _ = built
    expected = json.loads(selinux_audit.EXPECTED.read_text())
    expected["connect_bus_socket"].remove("sealbus_demo_client_t")
    changed = tmp_path / "expected.json"
    changed.write_text(json.dumps(expected))
    assert selinux_audit.main(["--policy", str(policy_path), "--expected", str(changed)]) == 1
    assert "unexpected: sealbus_demo_client_t" in capsys.readouterr().out


def test_neverallow_violation_is_rejected(tmp_path):
    """The invariants are enforced at build/link time: a module granting the broker a TCP
    socket or a non-launcher mount of the payload fs must not link."""
    mod = tmp_path / "module"
    mod.mkdir()
    for name in ("sealbus.if", "sealbus.fc"):
        shutil.copy2(selinux_audit.POLICY_SRC / name, mod / name)
    te = (selinux_audit.POLICY_SRC / "sealbus.te").read_text()
    te += "\nallow sealbus_t self:tcp_socket create;\nallow sealbus_demo_client_t sealbus_fs_t:filesystem mount;\n"
    (mod / "sealbus.te").write_text(te)
    subprocess.run(
        ["make", "-f", str(selinux_audit.DEVEL_MAKEFILE), "sealbus.pp"], cwd=mod, capture_output=True, check=True
    )
    with pytest.raises(selinux_audit.AuditError, match="neverallow"):
        selinux_audit.link_policy(mod / "sealbus.pp", tmp_path / "root")


def _allowed(policy, source: str, target: str, tclass: str) -> set[str]:
    """The permissions the linked policy allows source on target:tclass (attributes expanded)."""
    from setools import TERuleQuery

    q = TERuleQuery(policy, ruletype=["allow"], source=source, target=target, tclass=[tclass])
    return {str(p) for rule in q.results() for p in rule.perms}


def test_dbus_class_rules_of_the_demo_domains(built):
    """What the enforcing tier's dbus-class cases rely on: the service owns names (unassociated ones
    against sealbus_t, associated ones against sealbus_demo_name_t), client and service talk, the
    stranger may reach the bus driver but no peer and own nothing, and a client may not own names."""
    _, _, policy = built
    assert "acquire_svc" in _allowed(policy, "sealbus_demo_service_t", "sealbus_t", "dbus")
    assert "acquire_svc" in _allowed(policy, "sealbus_demo_service_t", "sealbus_demo_name_t", "dbus")
    assert "send_msg" in _allowed(policy, "sealbus_demo_client_t", "sealbus_demo_service_t", "dbus")
    assert "send_msg" in _allowed(policy, "sealbus_demo_service_t", "sealbus_demo_client_t", "dbus")
    for domain in ("sealbus_demo_client_t", "sealbus_demo_service_t", "sealbus_demo_stranger_t"):
        assert "send_msg" in _allowed(policy, domain, "sealbus_t", "dbus"), domain
    for target in ("sealbus_demo_service_t", "sealbus_demo_client_t", "sealbus_demo_stranger_t"):
        assert _allowed(policy, "sealbus_demo_stranger_t", target, "dbus") == set(), target
    assert _allowed(policy, "sealbus_demo_client_t", "sealbus_demo_client_t", "dbus") == set()
    for domain in ("sealbus_demo_client_t", "sealbus_demo_stranger_t"):
        for target in ("sealbus_t", "sealbus_demo_name_t"):
            assert "acquire_svc" not in _allowed(policy, domain, target, "dbus"), (domain, target)


def test_launcher_can_start_the_broker_under_enforcement(built):
    """The launcher asks selinuxfs before starting the broker (enforce, create: nsswitch domains
    dontaudit selinuxfs, so a missing rule was a bare EACCES with no AVC), enters sealbus_t with
    no_new_privs set, and writes the broker's USER_AVC records; the broker holds no capability."""
    _, _, policy = built
    assert {"read", "write", "open"} <= _allowed(policy, "sealbus_launch_t", "security_t", "file")
    assert "compute_create" in _allowed(policy, "sealbus_launch_t", "security_t", "security")
    assert "nnp_transition" in _allowed(policy, "sealbus_launch_t", "sealbus_t", "process2")
    assert "audit_write" in _allowed(policy, "sealbus_launch_t", "sealbus_launch_t", "capability")
    assert "nlmsg_relay" in _allowed(policy, "sealbus_launch_t", "sealbus_launch_t", "netlink_audit_socket")
    assert _allowed(policy, "sealbus_t", "sealbus_t", "capability") == set()
    assert {"compute_av"} <= _allowed(policy, "sealbus_t", "security_t", "security")
    assert {"open", "read", "write", "map"} <= _allowed(policy, "sealbus_t", "security_t", "file")


def test_least_privilege_checked_against_the_code(built):
    """Only what the code uses (issue 20, item 5): the launcher reads the bus config in
    /etc/dbus-1 (dbusd_etc_t); /run/sealbus is root-owned, so no chown/fowner/DAC override; no
    setsched/setrlimit; fusectl is not written (a forced unmount aborts a hung payload fs); the
    broker has no syslog socket."""
    _, _, policy = built
    assert {"read", "open"} <= _allowed(policy, "sealbus_launch_t", "dbusd_etc_t", "file")
    assert {"read", "search"} <= _allowed(policy, "sealbus_launch_t", "dbusd_etc_t", "dir")
    caps = _allowed(policy, "sealbus_launch_t", "sealbus_launch_t", "capability")
    assert caps & {"chown", "fowner", "dac_override", "dac_read_search"} == set(), caps
    assert {"setuid", "setgid", "setpcap", "sys_admin", "kill"} <= caps
    for domain in ("sealbus_launch_t", "sealbus_t"):
        assert _allowed(policy, domain, domain, "process") & {"setsched", "setrlimit"} == set(), domain
    assert _allowed(policy, "sealbus_launch_t", "fusefs_t", "file") & {"write", "append"} == set()
    assert "unmount" in _allowed(policy, "sealbus_launch_t", "sealbus_fs_t", "filesystem")
    assert _allowed(policy, "sealbus_t", "devlog_t", "sock_file") == set()
    assert _allowed(policy, "sealbus_t", "syslogd_t", "unix_dgram_socket") == set()
