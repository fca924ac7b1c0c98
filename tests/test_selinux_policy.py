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
    writers = set(answers["write_payload_fs"])
    assert "sealbus_t" not in writers  # the broker never writes the payload fs
    assert "sealbus_demo_service_t" not in writers  # read-only interface
    assert all(w.endswith("]") for w in writers - {"sealbus_demo_client_t"})  # others only via the boolean
    assert "sealbus_demo_denied_t" not in {o.split(" ")[0] for o in answers["open_payload_fs"]}
    assert "sealbus_t" not in {f.split(" ")[0] for f in answers["payload_flows_to_network"]}


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
    subprocess.run(["make", "-f", str(selinux_audit.DEVEL_MAKEFILE), "sealbus.pp"], cwd=mod, capture_output=True,
                   check=True)
    with pytest.raises(selinux_audit.AuditError, match="neverallow"):
        selinux_audit.link_policy(mod / "sealbus.pp", tmp_path / "root")
