"""`sealbus policy audit`: what the built SELinux policy lets domains do to the bus.

The policy module is only worth something if the whole policy it is linked
into (the distribution's plus ours) keeps the invariants, so the audit asks
the linked binary policy, not our sources: attribute rules from elsewhere
(unconfined, file_type, ...) are where surprises come from. The policy is
built without a running kernel: the module with the distribution's devel
Makefile, then linked by `semodule` into a copy of the distribution's policy
store under a temporary root (`semodule -p ROOT -n`).

The answers are compared with policy/audit-expected.json; any difference is a
failure, so a change in who may reach the bus has to be made on purpose.

The production module (what packages ship) is audited alone. The enforcing
tier also loads the test module policy/test/sealbus_test (its demo domains):
``--with-test-module`` links it too and expects, on top of the production
answers, exactly the ones in policy/test/audit-expected-added.json.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
POLICY_SRC = REPO / "policy"
EXPECTED = POLICY_SRC / "audit-expected.json"
MODULE = "sealbus"
TEST_MODULE = "sealbus_test"  # the enforcing tier's demo domains, never packaged
TEST_POLICY_SRC = POLICY_SRC / "test"
EXPECTED_TEST_ADDED = TEST_POLICY_SRC / "audit-expected-added.json"  # what the test module adds
DEVEL_MAKEFILE = Path("/usr/share/selinux/devel/Makefile")
STORE = "default"

BUS_SOCKET_OWNERS = ("sealbus_t", "sealbus_launch_t")
NETWORK_CLASSES = ("tcp_socket", "udp_socket", "sctp_socket", "rawip_socket")

QUESTIONS = {
    "connect_bus_socket": "domains that can connect to the bus socket (sealbus_runtime_t sock_file write + connectto)",
    "open_payload_fs": "domains that can open files on the payload fs (sealbus_fs_t file open)",
    "write_payload_fs": "domains that can write the payload fs (sealbus_fs_t file write/append)",
    "send_msg_bus": "domains that can send_msg to the bus (sealbus_t dbus send_msg: every driver call but Hello)",
    "acquire_svc_bus": "domains that can own unlabelled bus names (sealbus_t dbus acquire_svc)",
    "transition_into_broker": "domains that can transition into sealbus_t",
    "payload_flows_to_network": "direct information flows from sealbus_fs_t into network-capable domains",
    "read_payload_fs": "domains that can read payload fs files (sealbus_fs_t file read: a passed fd needs no open)",
    "ptrace_broker": "domains that can ptrace the broker (sealbus_t process ptrace: its memory holds payload bytes)",
    "payload_flows_to_network_deep": (
        "flows sealbus_fs_t -> payload reader -> X into the network: READER -> X where X is a network-capable "
        "domain or a type one reads (default booleans; setools weights >= 3, no dbus class, no null/zero device)"
    ),
}
# Deep flows: what the type-level model counts as a flow but carries no payload bytes.
DEEP_FLOW_MIN_WEIGHT = 3  # setools permission map: leaves out signals and metadata (weight 1-2)
DEEP_FLOW_SKIP_CLASSES = {"dbus"}  # the bus's purpose: which peer may message which is its own question
DEEP_FLOW_SKIP_TYPES = {"null_device_t", "zero_device_t"}  # reading them returns nothing written


class AuditError(RuntimeError):
    """The policy could not be built or loaded."""


# -- building -------------------------------------------------------------------------------------


def build_modules(out_dir: Path, *, with_test: bool = False, src: Path = POLICY_SRC) -> tuple[list[Path], str]:
    """Compile sealbus.pp (and with_test, sealbus_test.pp from src/test) with the distribution's devel
    Makefile in out_dir; returns (the .pp paths, the compiler output).

    Raises AuditError carrying the compiler output on failure."""
    modules = [MODULE, TEST_MODULE] if with_test else [MODULE]
    for module in modules:
        where = src if module == MODULE else src / "test"
        for ext in ("te", "if", "fc"):
            shutil.copy2(where / f"{module}.{ext}", out_dir / f"{module}.{ext}")
    proc = subprocess.run(
        ["make", "-f", str(DEVEL_MAKEFILE), *(f"{m}.pp" for m in modules)],
        cwd=out_dir,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise AuditError(f"module build failed:\n{proc.stdout}{proc.stderr}")
    return [out_dir / f"{m}.pp" for m in modules], proc.stdout + proc.stderr


def link_policy(modules: list[Path], root: Path) -> Path:
    """Link the modules into a copy of the distribution's store under root; returns the binary policy."""
    store = Path("/var/lib/selinux") / STORE
    config = Path("/etc/selinux") / STORE
    if not store.is_dir() or not config.is_dir():
        raise AuditError(f"distribution policy store missing ({store}, {config}): install selinux-policy-default")
    shutil.copytree(store, root / "var/lib/selinux" / STORE, symlinks=True)
    shutil.copytree(config, root / "etc/selinux" / STORE, symlinks=True)
    # expand-check=1: check every neverallow against the whole linked policy
    # (distributions ship 0), so the invariants are proven, not just written.
    conf = Path("/etc/selinux/semanage.conf")
    lines = [ln for ln in (conf.read_text().splitlines() if conf.exists() else []) if "expand-check" not in ln]
    (root / "etc/selinux/semanage.conf").write_text("\n".join([*lines, "expand-check = 1", ""]))
    proc = subprocess.run(
        ["semodule", "-p", str(root), "-s", STORE, "-n", *(arg for pp in modules for arg in ("-i", str(pp)))],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise AuditError(f"semodule link failed:\n{proc.stdout}{proc.stderr}")
    policies = sorted((root / "etc/selinux" / STORE / "policy").glob("policy.*"))
    if not policies:
        raise AuditError("semodule produced no binary policy")
    return policies[-1]


def build_policy(work: Path, *, with_test: bool = False, src: Path = POLICY_SRC) -> Path:
    """Module(s) + distribution policy, linked; returns the binary policy path under work."""
    mod_dir = work / "module"
    mod_dir.mkdir(parents=True, exist_ok=True)
    modules, _ = build_modules(mod_dir, with_test=with_test, src=src)
    return link_policy(modules, work / "root")


# -- questions ------------------------------------------------------------------------------------


def _expand(type_or_attr) -> set[str]:
    try:
        return {str(t) for t in type_or_attr.expand()}
    except AttributeError:
        return {str(type_or_attr)}


def _label(rule) -> str:
    """'' for unconditional rules, ' [bool]' for conditional ones (the boolean expression)."""
    try:
        return f" [{rule.conditional}]"
    except Exception:  # setools raises RuleNotConditional
        return ""


def _sources(policy, target: str, tclass: str, perms: set[str]) -> set[str]:
    from setools import TERuleQuery

    query = TERuleQuery(policy, ruletype=["allow"], target=target, tclass=[tclass], perms=perms)
    out: set[str] = set()
    for rule in query.results():
        suffix = _label(rule)
        out |= {name + suffix for name in _expand(rule.source)}
    return out


def _strip(names: set[str]) -> dict[str, str]:
    """name -> suffix (prefer the unconditional form when both exist, else the first boolean
    expression in sort order: the answer must not depend on the order rules come in)."""
    res: dict[str, str] = {}
    for entry in names:
        name, _, cond = entry.partition(" [")
        suffix = f" [{cond}" if cond else ""
        if name not in res or not suffix or (res[name] and suffix < res[name]):
            res[name] = suffix
    return res


def connect_bus_socket(policy) -> list[str]:
    writers = _strip(_sources(policy, "sealbus_runtime_t", "sock_file", {"write"}))
    connectors: dict[str, str] = {}
    for owner in BUS_SOCKET_OWNERS:
        for name, suffix in _strip(_sources(policy, owner, "unix_stream_socket", {"connectto"})).items():
            if name not in connectors or not suffix or (connectors[name] and suffix < connectors[name]):
                connectors[name] = suffix
    both = writers.keys() & connectors.keys()
    return sorted(name + (writers[name] or connectors[name]) for name in both)


def payload_fs_access(policy, perms: set[str]) -> list[str]:
    found = _strip(_sources(policy, "sealbus_fs_t", "file", perms))
    return sorted(name + suffix for name, suffix in found.items())


def bus_dbus_access(policy, perm: str) -> list[str]:
    """Who may ask the bus driver (send_msg) or own a name no <associate> labels (acquire_svc):
    the broker checks both against its own label."""
    found = _strip(_sources(policy, "sealbus_t", "dbus", {perm}))
    return sorted(name + suffix for name, suffix in found.items() if name != "sealbus_t")


def transitions_into_broker(policy) -> list[str]:
    from setools import DomainTransitionAnalysis

    dta = DomainTransitionAnalysis(policy, reverse=True)
    return sorted({str(step.source) for step in dta.transitions("sealbus_t")} - {"sealbus_t"})


def network_capable(policy) -> set[str]:
    """Domains allowed to create an IP socket of any kind."""
    from setools import TERuleQuery

    out: set[str] = set()
    for tclass in NETWORK_CLASSES:
        for rule in TERuleQuery(policy, ruletype=["allow"], tclass=[tclass], perms={"create"}).results():
            out |= _expand(rule.source)
    return out


def _direct_flow_targets(policy, perm_map, booleans: dict[str, bool] | None) -> set[str]:
    """One-step flows out of sealbus_fs_t, weighed with the setools permission map.

    The same answer as InfoFlowAnalysis.infoflows("sealbus_fs_t", out=True)
    (read-weighted rules on it as target, write-weighted rules with it as
    source) without building the whole policy's flow graph (minutes)."""
    from setools import TERuleQuery

    def enabled(rule) -> bool:
        if booleans is None:
            return True
        try:
            cond = rule.conditional
        except Exception:  # RuleNotConditional
            return True
        return bool(cond.evaluate(**booleans)) == bool(rule.conditional_block)

    out: set[str] = set()
    for rule in TERuleQuery(policy, ruletype=["allow"], target="sealbus_fs_t").results():
        if enabled(rule) and perm_map.rule_weight(rule).read > 0:
            out |= _expand(rule.source)
    for rule in TERuleQuery(policy, ruletype=["allow"], source="sealbus_fs_t").results():
        if enabled(rule) and perm_map.rule_weight(rule).write > 0:
            out |= _expand(rule.target)
    return out - {"sealbus_fs_t"}


class FlowIndex:
    """Every allow rule enabled under the booleans' default states, read once, as weighted edges
    between type or attribute names: deep flow questions become set lookups instead of one
    policy-wide rule query per type (minutes on a distribution policy)."""

    def __init__(self, policy, perm_map, min_weight: int = DEEP_FLOW_MIN_WEIGHT):
        perm_map.map_policy(policy)  # permissions newer than the map get its default weights
        defaults = {str(b): bool(b.state) for b in policy.bools()}
        self.readers: dict[str, set[str]] = {}  # target name -> source names that read it
        self.writes: dict[str, set[str]] = {}  # source name -> target names it writes
        self.attrs: dict[str, set[str]] = {}  # type -> its attributes
        self.members: dict[str, set[str]] = {}  # attribute -> its types
        for attr in policy.typeattributes():
            types = {str(t) for t in attr.expand()}
            self.members[str(attr)] = types
            for t in types:
                self.attrs.setdefault(t, set()).add(str(attr))
        for rule in policy.terules():
            if str(rule.ruletype) != "allow" or str(rule.tclass) in DEEP_FLOW_SKIP_CLASSES:
                continue
            try:
                cond = rule.conditional
                if bool(cond.evaluate(**defaults)) != bool(rule.conditional_block):
                    continue
            except Exception:  # RuleNotConditional
                pass
            weight = perm_map.rule_weight(rule)
            src, tgt = str(rule.source), str(rule.target)
            if weight.read >= min_weight:
                self.readers.setdefault(tgt, set()).add(src)
            if weight.write >= min_weight:
                self.writes.setdefault(src, set()).add(tgt)

    def _names(self, t: str) -> set[str]:
        return {t} | self.attrs.get(t, set())

    def _expand(self, names: set[str]) -> set[str]:
        return set().union(*(self.members.get(n, {n}) for n in names)) if names else set()

    def readers_of(self, t: str) -> set[str]:
        return self._expand(set().union(*(self.readers.get(n, set()) for n in self._names(t))))

    def written_by(self, d: str) -> set[str]:
        return self._expand(set().union(*(self.writes.get(n, set()) for n in self._names(d))))


def payload_flows_to_network_deep(policy, net: set[str] | None = None) -> list[str]:
    """READER -> X for every payload-fs reader that is not network-capable itself and every X it
    writes through which bytes reach a network-capable domain (X is one, or one reads X). The
    one-step question covers readers that are network-capable."""
    from setools import PermissionMap

    net = network_capable(policy) if net is None else net
    index = FlowIndex(policy, PermissionMap())
    out = set()
    for reader in index.readers_of("sealbus_fs_t") - net:
        for x in index.written_by(reader) - {reader, "sealbus_fs_t"} - DEEP_FLOW_SKIP_TYPES:
            if x in net or index.readers_of(x) & net:
                out.add(f"{reader} -> {x}")
    return sorted(out)


def ptrace_broker(policy) -> list[str]:
    found = _strip(_sources(policy, "sealbus_t", "process", {"ptrace"}))
    return sorted(name + suffix for name, suffix in found.items())


def payload_flows_to_network(policy, full_graph: bool = False) -> list[str]:
    """Direct flows under the booleans' default states; ones that need a boolean flipped get ' [conditional]'."""
    from setools import InfoFlowAnalysis, PermissionMap

    perm_map = PermissionMap()
    net = network_capable(policy)
    defaults = {str(b): bool(b.state) for b in policy.bools()}

    def targets(booleans):
        if full_graph:
            ifa = InfoFlowAnalysis(policy, perm_map, min_weight=1, booleans=booleans)
            return {str(step.target) for step in ifa.infoflows("sealbus_fs_t", out=True)} & net
        return _direct_flow_targets(policy, perm_map, booleans) & net

    always = targets(defaults)
    conditional = targets(None) - always
    return sorted(always | {name + " [conditional]" for name in conditional})


def load_policy(policy_path: Path):
    """The binary policy at policy_path, with the sealbus module in it; AuditError saying what is wrong."""
    from setools import SELinuxPolicy
    from setools.exception import InvalidType, SEToolsException

    if not os.path.exists(policy_path):  # setools' own error names neither the file nor the cause
        raise AuditError(f"{policy_path}: {os.strerror(errno.ENOENT)}")
    try:
        policy = SELinuxPolicy(str(policy_path))
    except SEToolsException as e:
        raise AuditError(f"{policy_path}: not a binary SELinux policy ({e})") from None
    try:
        policy.lookup_type("sealbus_t")
    except InvalidType:
        why = "the sealbus module is not in this policy"
        fix = "install sealbus-selinux or load policy/sealbus.pp; without --policy the audit builds one"
        raise AuditError(f"{policy_path} has no sealbus_t: {why} ({fix})") from None
    return policy


def audit(policy_path: Path, full_graph: bool = False) -> dict[str, list[str]]:
    """Answer every question in QUESTIONS for the binary policy at policy_path."""
    policy = load_policy(policy_path)
    return {
        "connect_bus_socket": connect_bus_socket(policy),
        "open_payload_fs": payload_fs_access(policy, {"open"}),
        "write_payload_fs": payload_fs_access(policy, {"write", "append"}),
        "send_msg_bus": bus_dbus_access(policy, "send_msg"),
        "acquire_svc_bus": bus_dbus_access(policy, "acquire_svc"),
        "transition_into_broker": transitions_into_broker(policy),
        "payload_flows_to_network": payload_flows_to_network(policy, full_graph),
        "read_payload_fs": payload_fs_access(policy, {"read"}),
        "ptrace_broker": ptrace_broker(policy),
        "payload_flows_to_network_deep": payload_flows_to_network_deep(policy),
    }


def compare(actual: dict[str, list[str]], expected: dict[str, list[str]]) -> dict[str, tuple[list[str], list[str]]]:
    """question -> (unexpected, missing); only questions that differ."""
    diff = {}
    for key in QUESTIONS:
        got, want = set(actual.get(key, [])), set(expected.get(key, []))
        if got != want:
            diff[key] = (sorted(got - want), sorted(want - got))
    return diff


def expected_answers(expected: Path = EXPECTED, added: Path | None = None) -> dict[str, list[str]]:
    """The expected answers; with ``added`` (the test module's file), plus the answers it adds."""
    answers = json.loads(expected.read_text())
    if added is not None:
        for key, names in json.loads(added.read_text()).items():
            answers[key] = sorted(set(answers.get(key, [])) | set(names))
    return answers


def added_answers(actual: dict[str, list[str]], base: dict[str, list[str]]) -> dict[str, list[str]]:
    """What ``actual`` answers on top of ``base`` (the test module's file). A module only adds rules,
    so a base answer missing from ``actual`` means the base is stale: AuditError."""
    missing = {key: sorted(set(base.get(key, [])) - set(actual[key])) for key in QUESTIONS}
    missing = {key: names for key, names in missing.items() if names}
    if missing:
        raise AuditError(f"answers of the production module missing with the test module (record them first): "
                         f"{missing}")  # fmt: skip
    added = {key: sorted(set(actual[key]) - set(base.get(key, []))) for key in QUESTIONS}
    return {key: names for key, names in added.items() if names}


def render(actual: dict[str, list[str]], diff: dict[str, tuple[list[str], list[str]]]) -> str:
    lines = []
    for key, question in QUESTIONS.items():
        status = "DIFFERS" if key in diff else "ok"
        lines.append(f"== {key}: {question} [{status}]")
        lines.extend(f"   {name}" for name in actual[key]) if actual[key] else lines.append("   (none)")
        if key in diff:
            unexpected, missing = diff[key]
            lines.extend(f"   + unexpected: {name}" for name in unexpected)
            lines.extend(f"   - missing:    {name}" for name in missing)
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="sealbus policy audit",
        description=(
            "Audit the SELinux policy with setools: who can connect to the bus socket, send to the bus "
            "driver, own names, open or write the payload filesystem, transition into the broker domain, "
            "and where payload data can flow to a network-capable domain. Without --policy, builds "
            "policy/sealbus.pp and links it into a copy of the distribution policy (no running kernel "
            "needed). Exits 1 if the answers differ from the expected set."
        ),
    )
    parser.add_argument("--policy", type=Path, help="binary policy to audit (e.g. /sys/fs/selinux/policy)")
    parser.add_argument("--expected", type=Path, default=EXPECTED, help=f"expected answers (default {EXPECTED})")
    parser.add_argument(
        "--with-test-module",
        action="store_true",
        help=f"the policy also holds the test module {TEST_MODULE} (the enforcing tier's demo domains; built "
        f"and linked too without --policy): expect in addition the answers in {EXPECTED_TEST_ADDED}",
    )
    parser.add_argument("--write-expected", action="store_true", help="record the current answers as expected")
    parser.add_argument(
        "--infoflow-graph",
        action="store_true",
        help="answer the flow question with setools InfoFlowAnalysis over the whole policy graph (slow, minutes)",
    )
    parser.add_argument("--json", action="store_true", help="print the answers as JSON")
    args = parser.parse_args(argv)

    try:
        if args.policy:
            actual = audit(args.policy, args.infoflow_graph)
        else:
            with tempfile.TemporaryDirectory(prefix="sealbus-audit-") as work:
                actual = audit(build_policy(Path(work), with_test=args.with_test_module), args.infoflow_graph)
    except (AuditError, OSError) as e:
        print(f"sealbus policy audit: {e}", file=sys.stderr)
        return 2

    added = EXPECTED_TEST_ADDED if args.with_test_module else None
    try:
        if args.write_expected:
            target, record = args.expected, actual
            if added is not None:
                target, record = added, added_answers(actual, expected_answers(args.expected))
            target.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
            print(f"wrote {target}")
            return 0
        expected = expected_answers(args.expected, added)
    except (OSError, ValueError, AuditError) as e:
        print(f"sealbus policy audit: expected answers ({args.expected}, {added}): {e}", file=sys.stderr)
        return 2
    diff = compare(actual, expected)
    print(json.dumps(actual, indent=2, sort_keys=True) if args.json else render(actual, diff))
    if diff:
        print(f"sealbus policy audit: FAIL, {len(diff)} answer(s) differ from {args.expected}"
              + (f" + {added}" if added else ""), file=sys.stderr)  # fmt: skip
        return 1
    print("sealbus policy audit: all answers match the expected set")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
