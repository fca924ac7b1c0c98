"""find_library without running programs, for the broker process.

ctypes.util.find_library runs /sbin/ldconfig (and ld) to find a library. The
broker's SELinux domain may execute nothing, and after the seccomp filter an
execve kills it, so pyseccomp's and trio's import-time lookups would fail or
be fatal. Imported first by the broker: the libraries it needs are tried by
their Debian/Fedora sonames, then the original lookup.
"""

import ctypes
import ctypes.util

SONAMES = {"seccomp": "libseccomp.so.2", "c": "libc.so.6", "pthread": "libc.so.6", "fuse3": "libfuse3.so.3"}
_original = ctypes.util.find_library


def find_library(name: str):
    soname = SONAMES.get(name)
    if soname is not None:
        try:
            ctypes.CDLL(soname)
            return soname
        except OSError:
            pass
    return _original(name)


ctypes.util.find_library = find_library
