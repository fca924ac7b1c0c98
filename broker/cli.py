"""The `sealbus` command (placeholder until the bus lands)."""
import sys


def main(argv=None):
    print("sealbus: not yet", file=sys.stderr)
    return 2


def dbus_daemon_main(argv=None):
    return main(argv)
