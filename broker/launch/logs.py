"""Log lines of the launcher and the broker: one format, on stderr (the journal under systemd)."""

import logging
import os
import sys


def setup_logging(level: str = "info") -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"sealbus[{os.getpid()}] %(levelname)s %(name)s: %(message)s",
    )
