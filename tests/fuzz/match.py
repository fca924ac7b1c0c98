"""Target ``match``: match-rule parsing, as AddMatch, RemoveMatch and BecomeMonitor get a rule.

Input: the rule as UTF-8 (a D-Bus string: valid UTF-8, no NUL; anything else never reaches the parser).
Invariants:
- only MatchRuleInvalid escapes;
- an accepted rule, written back in canonical form (every value quoted), parses to the same rule
  (same ``key()``, which is what RemoveMatch compares);
- matching an accepted rule against a few messages (header and body) raises nothing.
"""

from broker.bus.match import MatchRule, MatchRuleInvalid, parse_match_rule, rule_hits
from broker.wire.message import TYPE_NAMES, HeaderView, build_message

MESSAGES = [
    build_message(4, 1, path="/org/x/Obj", interface="org.x.I", member="Changed", signature="sos",
                  body=("org.x.I.Sub", "/org/x/Obj/a", "z")),
    build_message(1, 2, path="/", interface="org.x.J", member="Get", destination="org.x.Svc",
                  signature="ai", body=([1, 2],)),
    build_message(3, 3, error_name="org.x.Error", reply_serial=2, destination=":1.9", signature="s", body=("/a/",)),
]  # fmt: skip
HEADERS = [HeaderView(m) for m in MESSAGES]
OWNERS = {"org.x.Svc": ":1.7"}.get


class _Body:
    def __init__(self, h):
        self.h = h

    def get(self):
        return self.h.unmarshal_body()


def _quote(v: str) -> str:
    return "'" + v.replace("'", "'\\''") + "'"


def canonical(rule: MatchRule) -> str:
    """The rule written back with every value quoted, in a fixed key order."""
    parts = []
    if rule.type is not None:
        parts.append(f"type={_quote(TYPE_NAMES[rule.type])}")
    for key in ("sender", "interface", "member", "path", "path_namespace", "destination", "arg0namespace"):
        v = getattr(rule, key)
        if v is not None:
            parts.append(f"{key}={_quote(v)}")
    if rule.eavesdrop:
        parts.append("eavesdrop='true'")
    parts += [f"arg{i}={_quote(v)}" for i, v in sorted(rule.args.items())]
    parts += [f"arg{i}path={_quote(v)}" for i, v in sorted(rule.arg_paths.items())]
    return ",".join(parts)


def TestOneInput(data: bytes) -> None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return
    if "\0" in text:
        return
    try:
        rule = parse_match_rule(text)
    except MatchRuleInvalid:
        return
    again = canonical(rule)
    if len(again) <= 1024:
        assert parse_match_rule(again).key() == rule.key(), f"{text!r} and {again!r} differ"
    for h in HEADERS:
        assert rule_hits(rule, h, OWNERS, ":1.7", _Body(h)) in (True, False)
