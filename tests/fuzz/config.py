"""Target ``config``: the XML bus configuration with its includes, as the launcher loads it.

Input: up to three files separated by ``SEP``: main.conf, inc.conf (for ``<include>inc.conf</include>``)
and conf.d/a.conf (for ``<includedir>conf.d</includedir>``), written to a private temporary directory.
Invariants:
- only ConfigError escapes ``load_config`` (the launcher reports it and keeps the old config);
- an accepted config's compiled policy survives the trip the launcher makes it take to the broker
  (``to_json`` then ``Policy.from_json``) unchanged.
"""

import atexit
import logging
import os
import shutil

from broker.access.config import ConfigError, load_config
from broker.access.policy import Policy

from . import scratch_dir

logging.getLogger("sealbus.config").setLevel(logging.ERROR)  # its warnings, once per input, would flood the log
SEP = b"\n<!--next-file-->\n"
_DIR = scratch_dir("sealbus-fuzz-config-")
atexit.register(shutil.rmtree, _DIR, True)
FILES = [os.path.join(_DIR, "main.conf"), os.path.join(_DIR, "inc.conf"), os.path.join(_DIR, "conf.d", "a.conf")]
os.mkdir(os.path.join(_DIR, "conf.d"))


_written: list[bytes | None] = [None] * len(FILES)  # what each file holds now (None: absent)


def write_files(data: bytes) -> None:
    """Make the files hold ``data``'s parts; a file that already holds its part is left alone (a
    mutation changes one part, and each write or unlink costs more than parsing a small file)."""
    parts = data.split(SEP, 2)
    for i, path in enumerate(FILES):
        part = parts[i] if i < len(parts) else None
        if part == _written[i]:
            continue
        if part is None:
            os.unlink(path)
        else:
            with open(path, "wb") as f:
                f.write(part)
        _written[i] = part


def TestOneInput(data: bytes) -> None:
    write_files(data)
    try:
        cfg = load_config(FILES[0], resolve_names=False)
    except ConfigError:
        return
    if cfg.policy is not None:
        text = cfg.policy.to_json()
        assert Policy.from_json(text).to_json() == text, "the policy changes on its way to the broker"
