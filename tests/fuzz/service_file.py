"""Target ``service_file``: D-Bus service files (``[D-BUS Service]``), as the activation catalogue
reads them from the service directories.

Input: one byte whose low bit picks the bus (system or session), then the file's bytes, written as
``org.example.Svc.service`` in a private temporary directory.
Invariants:
- only ServiceFileError escapes ``read_service_file`` (a bad file is logged and skipped, never fatal);
- an accepted file names a valid well-known bus name; on the system bus it has User= and its file
  name is that name plus ``.service``;
- a file the system bus accepts, the session bus accepts too, and reads the same;
- an accepted service written back (values escaped) reads the same.
"""

import atexit
import os
import shutil

from broker.activation.service_file import ServiceFileError, read_service_file
from broker.wire.name_syntax import is_well_known_name

from . import scratch_dir

_DIR = scratch_dir("sealbus-fuzz-svc-")
atexit.register(shutil.rmtree, _DIR, True)
PATH = os.path.join(_DIR, "org.example.Svc.service")
AGAIN = os.path.join(_DIR, "again.service")


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t").replace(" ", "\\s")


def written_back(svc) -> bytes:
    lines = ["[D-BUS Service]", f"Name={_escape(svc.name)}", f"Exec={_escape(svc.exec)}"]
    for key, v in (("User", svc.user), ("SystemdService", svc.systemd_service),
                   ("AssumedAppArmorLabel", svc.assumed_apparmor_label)):  # fmt: skip
        if v is not None:
            lines.append(f"{key}={_escape(v)}")
    return ("\n".join(lines) + "\n").encode()


def _fields(svc) -> tuple:
    return (svc.name, svc.exec, svc.user, svc.systemd_service, svc.assumed_apparmor_label)


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    system_bus = bool(data[0] & 1)
    with open(PATH, "wb") as f:
        f.write(data[1:])
    try:
        svc = read_service_file(PATH, system_bus=system_bus)
    except ServiceFileError:
        return
    assert is_well_known_name(svc.name), f"accepted Name={svc.name!r}"
    if system_bus:
        assert svc.user is not None and svc.name + ".service" == "org.example.Svc.service"
        assert _fields(read_service_file(PATH, system_bus=False)) == _fields(svc), "the buses read it differently"
    with open(AGAIN, "wb") as f:
        f.write(written_back(svc))
    assert _fields(read_service_file(AGAIN, system_bus=False)) == _fields(svc), "written back, it reads otherwise"
