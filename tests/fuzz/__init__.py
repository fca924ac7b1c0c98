"""Coverage-guided fuzz targets (atheris/libFuzzer), one module per parser; docs/fuzzing.md.

Each target module has ``TestOneInput(data: bytes)``, which raises only when an invariant breaks.
Its corpus is tests/fuzz_corpus/<target>/. ``run.py`` runs a target under atheris; the plain pytest
replay of the corpora (tests/test_fuzz.py) calls the same functions without atheris.
"""

import importlib.util
import os
import tempfile

TARGETS = ["framer", "body", "message_oracle", "sasl", "match", "config", "control", "service_file"]

# what a target needs that may not be on this branch yet
_NEEDS = {"service_file": "broker.activation.service_file"}


def missing(name: str) -> str | None:
    """Why target ``name`` cannot run here, or None."""
    need = _NEEDS.get(name)
    try:
        if need and importlib.util.find_spec(need) is None:
            return f"{need} does not exist on this branch"
    except ModuleNotFoundError:
        return f"{need} does not exist on this branch"
    return None


def scratch_dir(prefix: str) -> str:
    """A private directory for targets that write files, in memory when /dev/shm is there: on an
    overlay /tmp one open() costs milliseconds, a hundred times the parse it feeds."""
    shm = "/dev/shm"
    return tempfile.mkdtemp(prefix=prefix, dir=shm if os.access(shm, os.W_OK) else None)
