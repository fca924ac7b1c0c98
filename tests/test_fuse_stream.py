"""A large payload through the FUSE payload fs costs neither the broker nor the sender its size in memory:
the sender streams the file in bounded chunks, the broker keeps the contents in unlinked files of its own
store directory. Real bus, real mount, real `sealbus send` and `receive` (benchmarks/fuse_rss.py, whose
1 GiB numbers are in docs/payload-fs.md)."""

import os
import re

import pytest

from benchmarks.fuse_rss import MiB, measure

pytestmark = [
    pytest.mark.root,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="mounts the payload fs: needs root"),
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse"),
    pytest.mark.timeout(600),
]

SIZE = 256 * MiB


def test_256_mib_fuse_transfer_keeps_broker_and_sender_rss_bounded(tmp_path):
    r = measure(SIZE, str(tmp_path))
    assert r["intact"], r
    # Both used to hold the whole payload (and more: 435 MB for 200 MiB). A chunk, Python and pyfuse3 now.
    assert r["broker_peak_kib"] - r["broker_rss_before_kib"] < 32 * 1024, r
    assert r["sender_peak_kib"] < 96 * 1024, r
    # --progress: sealing progress up to the whole size, on stderr
    shown = re.findall(r"sealing (\d+)/(\d+) MiB", r["sender_stderr"])
    assert shown and shown[-1] == ("256", "256") and len(shown) > 1, r["sender_stderr"]
    # where the contents were: a private directory of the bus, removed when it stopped
    store = re.search(r"contents in unlinked files under (\S+)\)", r["bus_log"])
    assert store and os.path.basename(store.group(1)).startswith("sealbus-store-"), r["bus_log"]
    assert not os.path.exists(store.group(1))
