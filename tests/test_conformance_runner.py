"""The conformance runner's own logic: TAP parsing and the ratchet on known gaps (make conformance runs it for real)."""

import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location(
    "conformance", Path(__file__).resolve().parent.parent / "scripts" / "conformance.py"
)
conformance = importlib.util.module_from_spec(spec)
spec.loader.exec_module(conformance)


def test_tap_lines_give_pass_fail_and_skip():
    text = "\n".join(
        [
            "# random seed: R02S",
            "ok 1 /a/b",
            "not ok 2 /a/c",
            "ok 3 /a/d # SKIP AppArmor not enabled",
            "ok 4 - dbus-daemon with stdin closed",
            "ok 5 # SKIP session bus does not appear to be managed by systemd",
            "Bail out! ERROR: something",
        ]
    )
    assert conformance.parse_tap(text) == [
        ("/a/b", "pass", ""),
        ("/a/c", "fail", ""),
        ("/a/d", "skip", "AppArmor not enabled"),
        ("dbus-daemon with stdin closed", "pass", ""),
        ("#5", "skip", "session bus does not appear to be managed by systemd"),
    ]


def test_a_gap_must_be_listed_and_a_fixed_one_must_leave_the_list():
    ref = {"/x": ("pass", ""), "/y": ("pass", ""), "/z": ("skip", "n/a"), "/w": ("pass", "")}
    sb = {"/x": ("pass", ""), "/y": ("fail", "boom"), "/z": ("skip", "n/a"), "/w": ("skip", "why")}
    gaps, unexpected, fixed = conformance.verdict(ref, sb, {"/x": "was broken", "/y": "known cause"})
    assert gaps == ["/w", "/y"]  # a skip where dbus-daemon passes is a gap too
    assert unexpected == ["/w"]
    assert fixed == ["/x"]


def test_the_known_list_names_a_user_and_a_cause_on_every_line():
    for line in conformance.KNOWN.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        case, sep, cause = line.partition("  # ")
        assert sep and cause.strip() and cause.strip() != "?", line
        assert case.split(" ", 1)[0] in ("root", "nobody"), line


def test_a_program_that_skips_as_a_whole_gives_one_skip_row():
    """test-apparmor-activation.sh says `1..0 # SKIP ...` where AppArmor is off: that is a row, not nothing."""
    text = "# Attempting to load AppArmor profiles\n1..0 # SKIP - unable to load AppArmor profiles\n"
    assert conformance.whole_program_results("t.sh", text, 0, "") == [
        ("t.sh", "skip", "unable to load AppArmor profiles")
    ]
    assert conformance.whole_program_results("t.sh", "1..1\nok 1 - x\n", 0, "") == [("t.sh: x", "pass", "")]
    assert conformance.whole_program_results("t.sh", "", 1, "") == [("t.sh: (exit status)", "fail", "exit 1")]


def test_every_installed_test_is_run_or_named_with_why_not():
    """Each test Debian's dbus-tests installs (/usr/share/installed-tests/dbus/*.test) is run by the runner or
    listed as testing libdbus alone, so a newer package cannot bring a program that starts a bus unseen."""
    if not conformance.INSTALLED.is_dir():
        pytest.skip("dbus-tests is not installed")
    installed = conformance.installed_tests()
    assert "test-dbus-daemon" in installed and "test-apparmor-activation.sh" in installed, installed
    assert conformance.unclassified(installed) == []
    run = set(conformance.BUS_PROGRAMS) | set(conformance.SESSION_PROGRAMS)
    assert not run & set(conformance.LIBDBUS_ONLY)
    assert {"test-apparmor-activation.sh", "integration/transient-services.sh"} <= run
