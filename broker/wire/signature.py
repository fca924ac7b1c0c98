"""D-Bus type signatures: validation and splitting into complete types.

Limits come from the specification: a signature is at most 255 bytes, arrays
nest at most 32 deep, structs (and dict entries) at most 32 deep, and both
together at most 64.
"""

from functools import lru_cache

from .errors import SignatureError

MAX_SIGNATURE_LENGTH = 255
MAX_ARRAY_DEPTH = 32
MAX_STRUCT_DEPTH = 32
MAX_TOTAL_DEPTH = 64

BASIC_TYPES = frozenset("ybnqiuxtdsogh")
FIXED_SIZE = {"y": 1, "b": 4, "n": 2, "q": 2, "i": 4, "u": 4, "x": 8, "t": 8, "d": 8, "h": 4}
ALIGNMENT = {
    "y": 1, "b": 4, "n": 2, "q": 2, "i": 4, "u": 4, "x": 8, "t": 8, "d": 8, "h": 4,
    "s": 4, "o": 4, "g": 1, "v": 1, "a": 4, "(": 8, "{": 8,
}  # fmt: skip


def _complete_type_end(sig: str, pos: int, arrays: int, structs: int) -> int:  # noqa: C901
    """Return the index just past the complete type starting at ``pos``."""
    if pos >= len(sig):
        raise SignatureError(f"signature {sig!r} ends where a type was expected")
    c = sig[pos]
    if c in BASIC_TYPES or c == "v":
        return pos + 1
    if c == "a":
        if arrays + 1 > MAX_ARRAY_DEPTH:
            raise SignatureError(f"signature {sig!r} nests arrays deeper than {MAX_ARRAY_DEPTH}")
        if arrays + structs + 1 > MAX_TOTAL_DEPTH:
            raise SignatureError(f"signature {sig!r} nests deeper than {MAX_TOTAL_DEPTH}")
        if pos + 1 < len(sig) and sig[pos + 1] == "{":
            return _dict_entry_end(sig, pos + 1, arrays + 1, structs)
        return _complete_type_end(sig, pos + 1, arrays + 1, structs)
    if c == "(":
        if structs + 1 > MAX_STRUCT_DEPTH:
            raise SignatureError(f"signature {sig!r} nests structs deeper than {MAX_STRUCT_DEPTH}")
        if arrays + structs + 1 > MAX_TOTAL_DEPTH:
            raise SignatureError(f"signature {sig!r} nests deeper than {MAX_TOTAL_DEPTH}")
        p = pos + 1
        if p < len(sig) and sig[p] == ")":
            raise SignatureError(f"signature {sig!r} has an empty struct")
        while True:
            if p >= len(sig):
                raise SignatureError(f"signature {sig!r} has an unclosed struct")
            if sig[p] == ")":
                return p + 1
            p = _complete_type_end(sig, p, arrays, structs + 1)
    if c == "{":
        raise SignatureError(f"signature {sig!r} has a dict entry outside an array")
    if c in ")}":
        raise SignatureError(f"signature {sig!r} has an unbalanced {c!r}")
    raise SignatureError(f"signature {sig!r} has unknown type code {c!r}")


def _dict_entry_end(sig: str, pos: int, arrays: int, structs: int) -> int:
    if structs + 1 > MAX_STRUCT_DEPTH:
        raise SignatureError(f"signature {sig!r} nests structs deeper than {MAX_STRUCT_DEPTH}")
    if arrays + structs + 1 > MAX_TOTAL_DEPTH:
        raise SignatureError(f"signature {sig!r} nests deeper than {MAX_TOTAL_DEPTH}")
    p = pos + 1
    if p >= len(sig) or sig[p] not in BASIC_TYPES:
        raise SignatureError(f"signature {sig!r}: dict entry key must be a basic type")
    p += 1
    p = _complete_type_end(sig, p, arrays, structs + 1)
    if p >= len(sig) or sig[p] != "}":
        raise SignatureError(f"signature {sig!r}: dict entry must have exactly two types")
    return p + 1


@lru_cache(maxsize=4096)
def split_signature(sig: str) -> tuple[str, ...]:
    """Validate ``sig`` and return its complete types; raises SignatureError."""
    if not isinstance(sig, str):
        raise SignatureError("signature must be a string")
    if len(sig) > MAX_SIGNATURE_LENGTH:
        raise SignatureError(f"signature is {len(sig)} bytes, longer than {MAX_SIGNATURE_LENGTH}")
    out = []
    pos = 0
    while pos < len(sig):
        end = _complete_type_end(sig, pos, 0, 0)
        out.append(sig[pos:end])
        pos = end
    return tuple(out)


def validate_signature(sig: str) -> None:
    split_signature(sig)


def is_single_complete_type(sig: str) -> bool:
    try:
        return len(split_signature(sig)) == 1
    except SignatureError:
        return False


def struct_members(t: str) -> tuple[str, ...]:
    """Complete types inside a struct ``(..)`` or dict entry ``{..}`` type string."""
    return split_signature(t[1:-1])
