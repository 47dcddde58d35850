"""Password hashes for ``http.password_hash``: PBKDF2-HMAC-SHA256 with a random salt (stdlib only).

Run ``python -m dicomnode.console.passwords`` to type a password and print its hash for the
configuration file. The format is ``pbkdf2_sha256$<iterations>$<salt b64>$<hash b64>``.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import hmac
import secrets
import sys

ITERATIONS = 600_000
PREFIX = "pbkdf2_sha256"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hash_password(password: str, iterations: int = ITERATIONS) -> str:
    """A salted PBKDF2 hash of ``password`` in the configuration's format."""
    if not password:
        raise ValueError("the password must not be empty")
    salt = secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return f"{PREFIX}${iterations}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, encoded: str) -> bool:
    """Whether ``password`` matches ``encoded`` (constant-time comparison); False if malformed."""
    try:
        prefix, iterations, salt, digest = encoded.split("$")
        if prefix != PREFIX:
            return False
        expected = base64.b64decode(digest)
        actual = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(salt), int(iterations))
    except ValueError:
        return False
    return hmac.compare_digest(actual, expected)


def main() -> int:
    first = getpass.getpass("password: ")
    if first != getpass.getpass("again: "):
        print("the passwords differ", file=sys.stderr)
        return 1
    print(hash_password(first))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
