"""Cache keys and credential hashes, pure Python (the reference twin).

The compiled twin (``_cachekey_c.pyx``) must return byte-identical results for
every input; this module is the definition it is tested against.

Canonical JSON is defined by the *decoded value*, exactly as Python's ``json``
module decodes it:

* the body must be strict UTF-8 and one JSON text (RFC 8259 grammar, JSON
  whitespace only, no ``NaN``/``Infinity`` constants);
* object keys are sorted by code point; a duplicated key keeps its last value;
* strings are written with only ``"``, ``\\`` and control characters escaped
  (so ``"\\u0061"`` and ``"a"`` are the same value); lone surrogates written
  as escapes survive as WTF-8 bytes;
* integers are kept exactly (``-0`` is ``0``); numbers with a fraction or an
  exponent are IEEE doubles written with ``repr`` (so ``1e2`` is ``100.0``,
  ``1`` and ``1.0`` stay different values; overflow is ``Infinity``);
* bodies nested deeper than ``MAX_DEPTH`` or holding an integer literal longer
  than ``MAX_INT_LITERAL`` characters are not canonicalised: they are hashed
  raw. Both limits make the result independent of interpreter settings
  (recursion limit, ``sys.set_int_max_str_digits``).

Anything that is not such a JSON text is hashed raw, under a different tag,
so a raw body can never produce the key of a canonical one.
"""

from __future__ import annotations

import json
import struct
from typing import Any

# CPython's own SHA-256, not OpenSSL's through hashlib: the same digests, a
# little slower per call, and a worker that never imports hashlib keeps
# 0.6 MB less (hashlib's OpenSSL digest tables).
try:
    from _sha2 import sha256  # Python 3.12+
except ImportError:
    try:
        from _sha256 import sha256  # Python 3.11
    except ImportError:
        from hashlib import sha256

__all__ = [
    "MAX_DEPTH",
    "MAX_INT_LITERAL",
    "cache_key",
    "canonical_json",
    "credential_hash",
]

# Nesting deeper than this is not canonicalised (hashed raw instead): real
# chat/completions bodies nest < 20 levels, and a fixed bound keeps both twins
# away from the interpreter's recursion limit.
MAX_DEPTH = 128
# Longer integer literals are not canonicalised: int() of long digit strings
# is limited by a process-wide setting (at least 640 digits), which must not
# change a cache key.
MAX_INT_LITERAL = 600

# Domain separation and versioning: a change of the key layout changes the
# prefix, so old and new keys never meet in a shared cache.
KEY_PREFIX = b"relay.cachekey.1\x00"
# Fixed project salt for credential hashes: the hash is a stable label, not a
# secret; salting it means a leaked label cannot be looked up in a table of
# plain SHA-256 hashes of known tokens.
CREDENTIAL_SALT = b"relay.credential.1\x00\x8c\x1f\xe2\x5b\x07\xd4\x93\x6a"
KEY_HEX_LENGTH = 32  # 128 bits of SHA-256
CREDENTIAL_HEX_LENGTH = 16  # 64 bits: a label, collisions only merge two labels

TAG_JSON = b"J"
TAG_RAW = b"R"
# The same tags when request headers that change the answer (``varying``)
# follow the tag: keys without such headers keep the layout they always had,
# and the tag says whether a length-prefixed ``varying`` field is present.
TAG_JSON_VARYING = b"j"
TAG_RAW_VARYING = b"r"
_VARYING_LENGTH = struct.Struct("<Q")
# Lengths of method, target and scope, so no bytes can move across a field
# boundary; the body is the last field and needs no length of its own.
_HEADER = struct.Struct("<QQQ")


class _NotCanonical(ValueError):
    """The body parses as JSON but is outside the canonicalised subset."""


def _parse_int(literal: str) -> int:
    if len(literal) > MAX_INT_LITERAL:
        raise _NotCanonical("integer literal too long")
    return int(literal)


def _reject_constant(name: str) -> float:
    raise _NotCanonical(f"{name} is not JSON")


_DECODER = json.JSONDecoder(parse_int=_parse_int, parse_constant=_reject_constant)
_ENCODER = json.JSONEncoder(
    ensure_ascii=False,
    separators=(",", ":"),
    sort_keys=True,
    check_circular=False,
    allow_nan=True,  # float overflow (1e400) decodes to inf: written "Infinity"
)


def _deeper_than(value: object, limit: int) -> bool:
    """True when containers nest more than ``limit`` levels (top level is 1)."""
    if limit <= 0:
        return True
    children: Any = value.values() if type(value) is dict else value  # else a list
    for child in children:
        if type(child) in (dict, list) and _deeper_than(child, limit - 1):
            return True
    return False


def canonical_json(body: bytes) -> bytes | None:
    """The canonical encoding of ``body``, or None when it is not canonical JSON."""
    try:
        text = body.decode("utf-8")
        value = _DECODER.decode(text)
    except (ValueError, RecursionError):  # UnicodeDecodeError, JSONDecodeError too
        return None
    # Only bodies with more brackets than the limit can be too deep: counting
    # bytes is far cheaper than walking the decoded value.
    if (
        type(value) in (dict, list)
        and body.count(b"{") + body.count(b"[") > MAX_DEPTH
        and _deeper_than(value, MAX_DEPTH)
    ):
        return None
    return _ENCODER.encode(value).encode("utf-8", "surrogatepass")


def cache_key(
    method: bytes, target: bytes, body: bytes, scope: bytes, varying: bytes = b""
) -> bytes:
    """32 lowercase hex bytes identifying (method, target, body, scope, varying).

    SHA-256 (truncated to 128 bits) over a prefix, the three field lengths,
    method, target, scope, a tag saying JSON or raw (and whether ``varying``
    follows), ``varying`` with its length when not empty, and the canonical
    body. ``varying`` is the canonical rendering of the request headers that
    change the answer (see ``relay.http.request.Request.varying_key``).
    SHA-256 because OpenSSL computes it with the CPU's SHA instructions:
    several times faster than BLAKE2b on request-sized bodies.
    """
    canonical = canonical_json(body)
    if canonical is None:
        tag = TAG_RAW_VARYING if varying else TAG_RAW
        canonical = body
    else:
        tag = TAG_JSON_VARYING if varying else TAG_JSON
    h = sha256(
        b"".join(
            (
                KEY_PREFIX,
                _HEADER.pack(len(method), len(target), len(scope)),
                method,
                target,
                scope,
                tag,
            )
        )
    )
    if varying:
        h.update(_VARYING_LENGTH.pack(len(varying)))
        h.update(varying)
    h.update(canonical)
    return h.hexdigest()[:KEY_HEX_LENGTH].encode("ascii")


def credential_hash(value: bytes) -> bytes:
    """16 lowercase hex bytes naming a credential without revealing it."""
    return sha256(CREDENTIAL_SALT + value).hexdigest()[:CREDENTIAL_HEX_LENGTH].encode("ascii")
