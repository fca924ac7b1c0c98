"""The first hour of a new user: every command the help lists runs, a bad input gets one line saying what is
wrong (never a traceback) and a non-zero exit, Ctrl-C exits quietly with 130, and `policy` has one grammar
and one exit-code convention."""

import os
import signal
import subprocess
import sys

import pytest
from jeepney import message_bus
from jeepney.io.blocking import open_dbus_connection

from broker.cli import DESCRIPTION

SEALBUS = os.path.join(os.path.dirname(sys.executable), "sealbus")
BAD_CONF = "<busconfig><frobnicate/></busconfig>"
POLICY = ('<busconfig><policy context="default"><allow user="*"/><allow own="*"/><deny own="org.x.Taken"/>'
          '<allow send_destination="*"/><deny send_type="method_call" send_destination="org.x.Svc"/>'
          '</policy></busconfig>')  # fmt: skip
SEND = ["send", "--dest", "org.x.Sink", "--interface", "org.x.Sink", "--member", "Take"]


def sealbus(*argv, cwd=None, env=None, timeout=60):
    return subprocess.run([SEALBUS, *argv], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    (d / "bad.conf").write_text(BAD_CONF)
    (d / "payload").write_bytes(b"x" * 100)
    return d


# (argv with {d} for the files dir, what the one line must say)
BAD_INPUTS = [
    (["run", "--config", "{d}/missing.conf"], "missing.conf: cannot read: No such file or directory"),
    (["run", "--config", "{d}/bad.conf"], "bad.conf:1: unknown element <frobnicate>"),
    (["run", "--payload-fs", "{d}/no-such-dir", "--address", "unix:path={d}/fs.sock"], "mkdir -p {d}/no-such-dir"),
    (["run", "--address", "bogus"], "address 'bogus'"),
    ([*SEND, "--address", "bogus", "--payload", "{d}/payload"], "bad --address 'bogus'"),
    (
        [*SEND, "--address", "unix:path={d}/no.sock", "--payload", "{d}/payload"],
        "cannot connect to unix:path={d}/no.sock: No such file or directory (is the bus running?",
    ),
    (
        [*SEND, "--address", "unix:path={d}/no.sock", "--payload", "{d}/big.iso"],
        "--payload {d}/big.iso: No such file or directory",
    ),
    (["receive", "--address", "bogus"], "bad --address 'bogus'"),
    (["receive", "--address", "unix:path={d}/no.sock"], "cannot connect to unix:path={d}/no.sock"),
    (["receive", "--address", "unix:path={d}/no.sock", "--out", "{d}/no-dir"], "mkdir -p {d}/no-dir"),
    (["cat-payload", "{d}/missing"], "{d}/missing: No such file or directory"),
    (["policy", "explain", "--config", "{d}/missing.conf", "--sender-uid", "0"], "missing.conf: cannot read"),
    (["policy", "check", "--config", "{d}/bad.conf"], "unknown element <frobnicate>"),
    (["policy", "audit", "--policy", "{d}/missing.pol"], "{d}/missing.pol: No such file or directory"),
    (["policy", "audit", "--policy", "{d}/bad.conf"], "{d}/bad.conf: not a binary SELinux policy"),
]


def _run_bad(files, argv):
    argv = [a.format(d=files) for a in argv]
    return sealbus(*argv, cwd=files)


@pytest.mark.parametrize(("argv", "message"), BAD_INPUTS, ids=[" ".join(a[:2]) + f"-{i}" for i, (a, _) in
                                                              enumerate(BAD_INPUTS)])  # fmt: skip
def test_bad_input_gets_one_line_and_exit_1(files, argv, message):
    r = _run_bad(files, argv)
    assert r.returncode == 1, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"sealbus {argv[0]}"), lines[0]
    assert message.format(d=files) in lines[0]


def test_no_command_prints_a_traceback_for_bad_input(files):
    for argv, _ in BAD_INPUTS:
        r = _run_bad(files, argv)
        assert "Traceback" not in r.stdout + r.stderr, (argv, r.stderr)


@pytest.fixture
def bus(tmp_path):
    sock = tmp_path / "bus.sock"
    proc = subprocess.Popen([SEALBUS, "run", "--address", f"unix:path={sock}"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    address = proc.stdout.readline().strip()
    assert address == f"unix:path={sock}"
    yield address
    proc.terminate()
    proc.wait(timeout=10)


def _as_at_a_terminal() -> None:
    """Ctrl-C as a user at a terminal sends it: SIGINT with its default action. A suite started in the
    background (``make test &``, a CI runner) hands its children SIGINT ignored, and a CLI keeps an
    inherited SIG_IGN, as background jobs should."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt(proc: subprocess.Popen) -> tuple[int, str]:
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=20)
    return proc.returncode, err


def test_ctrl_c_of_an_idle_receive_exits_130_quietly(bus):
    proc = subprocess.Popen([SEALBUS, "receive", "--address", bus], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=_as_at_a_terminal)  # fmt: skip
    assert proc.stdout.readline().startswith("listening as ")
    rc, err = _interrupt(proc)
    assert (rc, err) == (130, "")


def test_ctrl_c_of_a_send_waiting_for_its_reply_exits_130_quietly(bus, tmp_path):
    payload = tmp_path / "p"
    payload.write_bytes(b"y" * 4096)
    with open_dbus_connection(bus, enable_fds=True) as sink:  # owns the name and never answers
        sink.send_and_get_reply(message_bus.RequestName("org.x.Sink"))
        proc = subprocess.Popen([SEALBUS, *SEND, "--address", bus, "--payload", str(payload)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=_as_at_a_terminal)  # fmt: skip
        assert proc.stdout.readline().startswith("payload: size=4096")
        rc, err = _interrupt(proc)
    assert (rc, err) == (130, "")


def test_ctrl_c_of_run_leaves_no_temp_dir_behind(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    env["TMPDIR"] = str(tmp_path)
    proc = subprocess.Popen([SEALBUS, "run"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    address = proc.stdout.readline().strip()
    assert address.startswith(f"unix:path={tmp_path}/sealbus-"), address
    rc, err = _interrupt(proc)
    assert rc == 0 and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("level", ["info", "warning"])
def test_run_log_level(tmp_path, level):
    sock = tmp_path / "bus.sock"
    proc = subprocess.Popen([SEALBUS, "run", "--log-level", level, "--address", f"unix:path={sock}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout.readline().strip() == f"unix:path={sock}"
    with open_dbus_connection(f"unix:path={sock}"):
        pass
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert (" INFO " in err and "disconnected :1." in err) == (level == "info"), err


@pytest.mark.parametrize("level", [None, "info"])
def test_dbus_daemon_log_level(tmp_path, level):
    sock = tmp_path / "bus.sock"
    argv = [SEALBUS, "dbus-daemon", "--session", "--nofork", "--print-address=1", f"--address=unix:path={sock}"]
    proc = subprocess.Popen(argv + ([f"--log-level={level}"] if level else []), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout.readline().startswith(f"unix:path={sock},guid=")
    with open_dbus_connection(f"unix:path={sock}"):
        pass
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert ("disconnected :1." in err) == (level == "info"), err  # default: warning


def test_run_rejects_an_unknown_log_level():
    r = sealbus("run", "--log-level", "loud")
    assert r.returncode == 2 and "invalid choice: 'loud'" in r.stderr


# -- every command the help lists runs --------------------------------------------------------------


def _listed_commands() -> list[str]:
    body = DESCRIPTION.split("commands:", 1)[1]
    return [line.split()[0] for line in body.splitlines() if line.startswith("  ") and not line.startswith("   ")]


def test_help_lists_the_commands_this_file_and_others_exercise():
    assert _listed_commands() == ["run", "dbus-daemon", "policy", "send", "receive", "cat-payload", "bench"]


@pytest.mark.parametrize("cmd", _listed_commands())
def test_every_listed_command_has_working_help(cmd, tmp_path):
    r = sealbus(cmd, "--help", cwd=tmp_path)
    assert r.returncode == 0 and "usage:" in r.stdout, r.stderr
    assert "Traceback" not in r.stderr


def test_bench_runs_from_an_installed_sealbus(tmp_path):
    # not from the source tree (cwd elsewhere): only the installed package is importable
    r = sealbus("bench", "--calls", "50", "--payloads", "2", "--payload-size", "64K", cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = {line.split()[0]: line.split()[1:] for line in r.stdout.splitlines()[2:]}
    calls_per_s, rtt_us, payload_ms = (float(x) for x in rows["sealbus"])
    assert calls_per_s > 0 and rtt_us > 0 and payload_ms > 0
    assert "dbus-daemon" in rows


def test_bench_measures_a_running_bus_and_reports_a_dead_one(bus, tmp_path):
    r = sealbus("bench", "--targets", "", "--calls", "20", "--payloads", "1", "--bus", f"mine={bus}",
                "--bus", f"gone=unix:path={tmp_path}/none", cwd=tmp_path, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout.splitlines()
    assert [ln.split()[0] for ln in out[2:]] == ["mine", "gone"]
    assert "failed: cannot connect to" in out[3]


# -- policy: one grammar, one exit-code convention ----------------------------------------------------


@pytest.fixture
def policy_conf(tmp_path):
    f = tmp_path / "p.conf"
    f.write_text(POLICY)
    return str(f)


def test_explain_shows_rules_in_the_configs_words(policy_conf):
    r = sealbus("policy", "explain", "--config", policy_conf, "--sender-uid", "1000", "--dest", "org.x.Svc",
                "--interface", "org.x.I", "--member", "M")  # fmt: skip
    assert r.returncode == 3 and "DENIED" in r.stdout
    assert '=> <deny send_type="method_call" send_destination="org.x.Svc"/>' in r.stdout
    assert "type=1" not in r.stdout
    r = sealbus("policy", "explain", "--config", policy_conf, "--sender-uid", "1000", "--connect")
    assert r.returncode == 0 and '=> <allow user="*"/>' in r.stdout


@pytest.mark.parametrize(("what", "rc"), [(["--own", "org.x.Taken"], 3), (["--own", "org.x.Free"], 0),
                                          (["--connect"], 3)])  # fmt: skip
def test_explain_exit_code_is_the_same_for_send_own_and_connect(tmp_path, policy_conf, what, rc):
    conf = policy_conf
    if what == ["--connect"]:
        conf = tmp_path / "noconnect.conf"
        conf.write_text(POLICY.replace('<allow user="*"/>', '<deny user="*"/>'))
    r = sealbus("policy", "explain", "--config", str(conf), "--sender-uid", "1000", *what)
    assert r.returncode == rc, r.stdout + r.stderr
    assert ("DENIED" if rc else "ALLOWED") in r.stdout


def test_check_takes_config_like_explain_and_strict_problems_exit_3(tmp_path):
    f = tmp_path / "c.conf"
    f.write_text('<busconfig><policy context="default"><deny own="a.b"/><deny own="a.b"/></policy></busconfig>')
    r = sealbus("policy", "check", "--config", str(f))
    assert r.returncode == 0 and "shadowed" in r.stdout
    r = sealbus("policy", "check", "--config", str(f), "--strict")
    assert r.returncode == 3 and "1 problem(s)" in r.stdout
    r = sealbus("policy", "check")
    assert r.returncode == 2 and "--config" in r.stderr


@pytest.mark.parametrize("sub", ["explain", "check"])
def test_policy_help_documents_the_exit_codes(sub):
    r = sealbus("policy", sub, "--help")
    assert "3 the answer is no" in " ".join(r.stdout.split())


@pytest.mark.parametrize(("audit_rc", "rc"), [(0, 0), (1, 3), (2, 1)])
def test_audit_answers_in_the_policy_exit_code_convention(monkeypatch, audit_rc, rc):
    """selinux_audit's own codes (1 the answers differ, 2 error) as every policy subcommand's (3, 1)."""
    from broker.access import policy_cli, selinux_audit

    monkeypatch.setattr(selinux_audit, "main", lambda argv: audit_rc)
    assert policy_cli.main(["audit", "--policy", "/any"]) == rc


def _distribution_policy() -> str | None:
    """This machine's binary policy, if it exists and has no sealbus module in it."""
    import glob

    for path in sorted(glob.glob("/etc/selinux/*/policy/policy.[0-9]*")):
        try:
            from setools import SELinuxPolicy

            types = {str(t) for t in SELinuxPolicy(path).types()}
        except Exception:
            continue
        if "sealbus_t" not in types:
            return path
    return None


def test_audit_of_a_policy_without_the_sealbus_module_says_so_in_one_line(tmp_path):
    """`policy audit --policy /sys/fs/selinux/policy` before sealbus-selinux is installed: what an admin tries."""
    policy = _distribution_policy()
    if policy is None:
        pytest.skip("no binary policy without the sealbus module under /etc/selinux (or no setools)")
    r = sealbus("policy", "audit", "--policy", policy, cwd=tmp_path)
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert r.stderr.strip().splitlines() == [
        f"sealbus policy audit: {policy} has no sealbus_t: the sealbus module is not in this policy "
        "(install sealbus-selinux or load policy/sealbus.pp; without --policy the audit builds one)"
    ], r.stderr
