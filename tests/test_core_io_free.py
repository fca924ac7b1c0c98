"""The bus core (broker/bus/) performs no I/O: no files, no process state, no clocks, no sockets.

Everything it needs from the outside world (peer and own credentials, the time,
settings) is passed in by the trio shell (broker/io/); what it wants done
(deliver, close fds, disconnect) it records for the shell. This test reads the
source with ``ast`` so a later change that reaches out from the core fails here.
"""

import ast
import pathlib

import pytest

CORE = pathlib.Path(__file__).resolve().parent.parent / "broker" / "bus"

# modules whose import alone means the core talks to the world
IO_MODULES = {"os", "sys", "time", "socket", "select", "subprocess", "pathlib", "io", "shutil", "tempfile",
              "signal", "threading", "mmap", "fcntl", "resource", "pwd", "grp", "trio", "selectors", "datetime"}  # fmt: skip
IO_BUILTINS = {"open", "input", "print", "exec", "eval", "__import__"}


def _violations(tree: ast.AST) -> list[str]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [f"line {node.lineno}: import {a.name}" for a in node.names if a.name.split(".")[0] in IO_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] in IO_MODULES:
            out.append(f"line {node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in IO_BUILTINS:
            out.append(f"line {node.lineno}: {node.func.id}(...)")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in IO_MODULES:
            out.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
    return out


@pytest.mark.parametrize("path", sorted(CORE.glob("*.py")), ids=lambda p: p.name)
def test_core_module_does_no_io(path):
    assert _violations(ast.parse(path.read_text(), str(path))) == [], f"{path.name} reaches outside the core"


def test_the_check_sees_what_it_must_refuse():
    """The detector itself: each way the core used to (or could) reach out is reported."""
    samples = {
        'with open("/proc/self/attr/current") as f: pass': "open",
        "import os\nuid = os.getuid()": "os",
        "def f():\n    import time\n    return time.monotonic()": "time",
        "from socket import socketpair": "socket",
        "x = os.getpid()": "os.getpid",
    }
    for src, what in samples.items():
        found = _violations(ast.parse(src))
        assert found and any(what in v for v in found), (src, found)
    assert _violations(ast.parse("from .peer import Creds\nimport struct, secrets")) == []


def test_the_driver_answers_with_the_credentials_the_shell_passed():
    """Bus owner uid and the bus's own credentials come from the constructor, not from the process."""
    from broker.bus.peer import Creds
    from broker.bus.router import Bus

    own = Creds(4242, (4242,), 777, "system_u:system_r:sealbus_t:s0")
    bus = Bus(own=own)
    assert bus.self_peer.creds == own
    assert bus.driver.bus_owner_uid() == 4242
