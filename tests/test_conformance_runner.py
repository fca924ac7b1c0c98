"""The conformance runner's own logic: TAP parsing and the ratchet on known gaps (make conformance runs it for real)."""

import importlib.util
from pathlib import Path

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
            "Bail out! ERROR: something",
        ]
    )
    assert conformance.parse_tap(text) == [
        ("/a/b", "pass", ""),
        ("/a/c", "fail", ""),
        ("/a/d", "skip", "AppArmor not enabled"),
        ("dbus-daemon with stdin closed", "pass", ""),
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
