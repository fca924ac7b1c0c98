"""Every ```sh block of README.md runs as written from the repository root (after `make setup`).

A block whose first line is the marker comment below is not run; it may only hold `make run` / `make test`
(they serve until Ctrl-C or run the whole suite). Each block runs under `bash -e` in its own session, so a
bus a block leaves running after a failure is stopped with its process group.
"""

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
MARKER = "# not run by tests/test_readme.py:"
SKIPPABLE = ("make run", "make test")
FS_MOUNT = "/tmp/sealbus-fs"
LEFTOVERS = ("/tmp/sealbus.sock", "/tmp/big.bin", "/tmp/got")


def sh_blocks() -> list[str]:
    with open(README) as f:
        return re.findall(r"^```sh\n(.*?)^```$", f.read(), flags=re.M | re.S)


def _commands(block: str) -> list[str]:
    return [ln.split("#")[0].strip() for ln in block.splitlines() if ln.split("#")[0].strip()]


RUN = [b for b in sh_blocks() if not b.startswith(MARKER)]


def test_readme_has_blocks_and_only_make_blocks_are_skipped():
    assert len(RUN) >= 3
    for block in sh_blocks():
        if block.startswith(MARKER):
            assert all(c in SKIPPABLE for c in _commands(block)), block
        else:
            assert MARKER not in block, "the marker only counts as a block's first line"


def _missing(block: str) -> str | None:
    if not os.path.exists(os.path.join(ROOT, ".venv", "bin", "sealbus")):
        return "no .venv/bin/sealbus (make setup)"
    if "busctl " in block and shutil.which("busctl") is None:
        return "busctl is not installed"
    if "--payload-fs" in block:
        if not os.path.exists("/dev/fuse"):
            return "no /dev/fuse"
        if os.geteuid() != 0 and shutil.which("fusermount3") is None:
            return "not root and no fusermount3"
    if "/usr/share/dbus-1/system.conf" in block and not os.path.exists("/usr/share/dbus-1/system.conf"):
        return "no /usr/share/dbus-1/system.conf"
    return None


def _cleanup(proc: subprocess.Popen) -> None:
    try:  # background jobs of the block (a bus) share its process group, even once bash has exited
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # until the bus has stopped (and unmounted its payload fs)
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    if os.path.ismount(FS_MOUNT):  # a bus killed before it unmounted
        subprocess.run(["umount", "-l", FS_MOUNT], check=False)
    with contextlib.suppress(OSError):
        os.rmdir(FS_MOUNT)
    for path in LEFTOVERS:
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            os.unlink(path)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("block", RUN, ids=[_commands(b)[0][:40] for b in RUN])
def test_readme_block_runs_as_written(block, tmp_path):
    why = _missing(block)
    if why:
        pytest.skip(why)
    log = tmp_path / "out"
    with open(log, "w") as out:  # not a pipe: a bus left running after a failure must not hold the test
        proc = subprocess.Popen(["bash", "-e", "-c", block], cwd=ROOT, start_new_session=True,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
        try:
            proc.wait(timeout=180)
        finally:
            _cleanup(proc)
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    if "cmp " in block:
        assert "the payload arrived intact" in text
    if "policy explain" in block:  # its `|| echo` must only ever absorb the DENIED answer
        assert "DENIED" in text and "exit status 3 (3: DENIED)" in text, text[-3000:]
