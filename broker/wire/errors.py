"""Exceptions for malformed wire input.

Every parse failure raises a subclass of :class:`WireError` that says what
was wrong; callers that face untrusted peers catch ``WireError`` alone and
never see an unexpected exception type from this package.
"""


class WireError(ValueError):
    """Base class: the bytes (or the value to marshal) break the D-Bus rules."""


class SignatureError(WireError):
    """A type signature is malformed or exceeds a nesting/length limit."""


class TruncatedError(WireError):
    """The data ends before the value it announces."""


class PaddingError(WireError):
    """Alignment padding contains non-zero bytes."""


class InvalidValueError(WireError):
    """A value is out of its domain (bad boolean, bad UTF-8, NUL in string...)."""


class InvalidNameError(WireError):
    """An object path, bus name, interface, member or error name is invalid."""


class LimitExceededError(WireError):
    """An array, message or nesting depth is larger than the spec (or config) allows."""


class HeaderError(WireError):
    """The message header is malformed or lacks a field its type requires."""


class FdIndexError(WireError):
    """A UNIX_FD value refers to an fd the message does not carry."""


class SaslError(WireError):
    """The client broke the authentication protocol; the connection must close."""
