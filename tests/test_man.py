"""The man pages (man/) against the program: every command and option that `--help` shows is in the
page, under its command; every element, rule attribute and <limit> the config parser accepts is in
sealbus.conf(5); the pages render without a warning and install where man(1) finds them."""

import dataclasses
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from broker.access import policy_cli
from broker.access.config import RULE_ATTRS
from broker.bus.limits import NOTHING_TO_BOUND, Limits
from tests.conftest import ROOT, SEALBUS

MAN = Path(ROOT) / "man"
PAGES = ["sealbus.1", "sealbus-policy.1", "sealbus.conf.5"]

pytestmark = pytest.mark.skipif(shutil.which("groff") is None, reason="groff (groff-base) is not installed")


def render(page: str) -> str:
    """The page as a reader sees it, on lines long enough that no word is broken."""
    out = subprocess.run(["groff", "-man", "-Tascii", "-P-cbou", "-rLL=400n", str(MAN / page)],
                         capture_output=True, text=True, check=True)  # fmt: skip
    return out.stdout


def sections(page: str) -> dict[str, str]:
    """Rendered text by subsection (`.SS`, indented 3) or section (`.SH`, not indented) title."""
    found: dict[str, str] = {}
    title = ""
    for line in render(page).splitlines():
        m = re.match(r"^(?:   )?(\S.*?)\s*$", line)
        if m and not line.startswith("    "):
            title = m.group(1)
            found.setdefault(title, "")
        else:
            found[title] = found.get(title, "") + line + "\n"
    return found


def help_text(*argv: str) -> str:
    out = subprocess.run([SEALBUS, *argv, "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout


def help_options(text: str) -> list[str]:
    """The flags argparse lists in its options section (`  -x, --long ARG   help`)."""
    opts = re.findall(r"^  (?:-\w, )?(--[a-z][a-z0-9-]*)", text, re.M)
    assert opts, text
    return [o for o in opts if o != "--help"]


# (the command line whose --help is read, the page, the subsection that must describe its options)
COMMANDS = [
    (("run",), "sealbus.1", "sealbus run"),
    (("dbus-daemon",), "sealbus.1", "sealbus dbus-daemon, sealbus-dbus-daemon"),
    (("send",), "sealbus.1", "sealbus send"),
    (("receive",), "sealbus.1", "sealbus receive"),
    (("cat-payload",), "sealbus.1", "sealbus cat-payload"),
    (("bench",), "sealbus.1", "sealbus bench"),
    (("policy", "explain"), "sealbus-policy.1", "sealbus policy explain"),
    (("policy", "check"), "sealbus-policy.1", "sealbus policy check"),
    (("policy", "audit"), "sealbus-policy.1", "sealbus policy audit"),
]


@pytest.mark.parametrize(("argv", "page", "section"), COMMANDS, ids=[" ".join(c[0]) for c in COMMANDS])
def test_every_option_of_a_command_is_described_in_its_section(argv, page, section):
    text = sections(page).get(section)
    assert text is not None, f"{page} has no section {section!r}"
    missing = [o for o in help_options(help_text(*argv)) if not re.search(rf"(?<![\w-]){o}(?![\w-])", text)]
    assert not missing, f"{page}, {section}: options of `sealbus {' '.join(argv)}` not described: {missing}"


def test_every_command_that_help_lists_has_a_section():
    listed = re.findall(r"^  ([a-z][a-z-]+)  ", help_text().split("commands:", 1)[1], re.M)
    assert "run" in listed and "bench" in listed, listed
    titles = [t for t in sections("sealbus.1") if t.startswith("sealbus ")]
    missing = [c for c in listed if not any(re.match(rf"sealbus {c}\b", t) for t in titles)]
    assert not missing, f"commands in `sealbus --help` with no section in sealbus(1): {missing}"
    covered = {" ".join(argv) for argv, _, _ in COMMANDS} | {"policy"}
    assert set(listed) <= covered, "a new command: add it to COMMANDS so its options are checked"


def test_every_policy_subcommand_and_exit_status_is_in_sealbus_policy():
    subs = re.search(r"\{([a-z,]+)\}", help_text("policy")).group(1).split(",")
    assert {s for (_, *rest), _, _ in COMMANDS if rest for s in rest} == set(subs), "COMMANDS misses one"
    exit_status = sections("sealbus-policy.1")["EXIT STATUS"]
    for name in ("OK", "ERROR", "USAGE", "NO"):
        code = getattr(policy_cli, name)
        assert re.search(rf"^\s+{code}\s*$", exit_status, re.M) or re.search(rf"^\s+{code}\s{{2,}}", exit_status,
                                                                          re.M), (name, code, exit_status)  # fmt: skip
    assert "3" in policy_cli.EXIT_CODES and "DENIED" in exit_status


def _config_elements() -> set[str]:
    """Element names broker/access/config.py compares tags with (top level, <sealbus>, <selinux>, rules)."""
    src = (Path(ROOT) / "broker/access/config.py").read_text()
    names = set(re.findall(r'tag\s*[!=]=\s*"(\w+)"', src))
    for group in re.findall(r"tag\s+(?:not\s+)?in\s+\(([^)]*)\)", src):
        names |= set(re.findall(r'"(\w+)"', group))
    return names


def test_sealbus_conf_describes_every_element_attribute_and_limit():
    text = render("sealbus.conf.5")
    elements = _config_elements()
    assert {"busconfig", "policy", "limit", "sealbus", "fds", "busy_poll", "allow"} <= elements, elements
    missing = sorted(e for e in elements if not re.search(rf"<{e}[ />]", text))
    assert not missing, f"elements the parser accepts that sealbus.conf(5) does not describe: {missing}"
    missing = sorted(a for a in RULE_ATTRS if not re.search(rf"(?<![\w-]){a}(?![\w-])", text))
    assert not missing, f"rule attributes not described: {missing}"
    limits = sections("sealbus.conf.5")["LIMITS"]
    for f in dataclasses.fields(Limits):
        entry = re.search(rf"^       {f.name}\b.*?\n(.*?)(?=^       \S|\Z)", limits, re.M | re.S)
        assert entry, f"<limit name={f.name!r}> is not described"
        assert re.search(rf"Defaults? .*?(?<![\d-]){f.default}(?!\d)", entry.group(0)), (f.name, f.default)
        # the page says a limit bounds nothing exactly when the code does (NOTHING_TO_BOUND, which the log names)
        unbounded = "nothing to bound" in " ".join(entry.group(0).split())
        assert unbounded == (f.name in NOTHING_TO_BOUND), (f.name, entry.group(0))


def test_sealbus_conf_does_not_say_the_bus_activates_nothing():
    """Activation exists (broker/bus/activation.py): the page must not say otherwise."""
    text = " ".join(render("sealbus.conf.5").split())
    for claim in ("does not activate services", "activates no services"):
        assert claim not in text, claim


@pytest.mark.parametrize("page", PAGES)
def test_page_renders_without_warnings(page):
    groff = subprocess.run(["groff", "-man", "-ww", "-z", str(MAN / page)], capture_output=True, text=True)
    assert groff.returncode == 0 and groff.stderr == "", groff.stderr
    if shutil.which("man"):
        man = subprocess.run(["man", "--warnings", "-l", str(MAN / page)], capture_output=True, text=True,
                             env={"MANWIDTH": "80", "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})  # fmt: skip
        assert man.returncode == 0 and man.stderr == "", man.stderr
        assert "SEE ALSO" in man.stdout


@pytest.mark.skipif(shutil.which("man") is None, reason="man-db is not installed")
def test_installed_pages_are_found_by_man(tmp_path):
    mandir = tmp_path / "share" / "man"
    subprocess.run(["sh", str(MAN / "install.sh"), str(mandir)], check=True)
    env = {"MANWIDTH": "80", "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "MANPATH": str(mandir)}
    for section, name, expect in [("1", "sealbus", "sealbus run"), ("5", "sealbus.conf", "<sealbus>"),
                                  ("1", "sealbus-policy", "EXIT STATUS"),
                                  ("1", "sealbus-dbus-daemon", "sealbus dbus-daemon")]:  # fmt: skip
        out = subprocess.run(["man", section, name], capture_output=True, text=True, env=env, check=False)
        assert out.returncode == 0 and expect in out.stdout, (name, out.stderr)
