#!/usr/bin/env python3
"""Make a loadable Redis ACL file from deploy/redis-users.acl, with new random passwords.

Writes into --out:
  users.acl      the ACL file for redis-server (--aclfile): passwords only as SHA-256 hashes,
                 comments dropped (Redis refuses them), key patterns on --prefix
  <role>.env     COMBINER_REDIS_URL=redis[s]://<role>:<password>@HOST:PORT/0 for each role
                 (mode 0600: give each process only its own)
Standard library only. docs/redis.md, "ACL users".
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pathlib
import re
import secrets
import sys

TEMPLATE = pathlib.Path(__file__).resolve().parent / "redis-users.acl"
_PLACEHOLDER = re.compile(r">CHANGE_ME_([A-Z]+)\b")
_PATTERN = re.compile(r"(^|\s)(%R~|%W~|%RW~|~|&)so:")
_PREFIX = re.compile(r"^[A-Za-z0-9._-]{1,64}\Z")  # as broker/keys.py accepts


def render(template: str, prefix: str = "so") -> tuple[str, dict[str, str]]:
    """(ACL file text, {role: password}) with a new password for every placeholder."""
    if not _PREFIX.match(prefix):
        raise ValueError(f"bad prefix {prefix!r}")
    passwords: dict[str, str] = {}
    lines = []
    for line in template.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue

        def hashed(match: re.Match) -> str:
            role = match.group(1).lower()
            password = passwords.setdefault(role, secrets.token_urlsafe(32))
            return "#" + hashlib.sha256(password.encode()).hexdigest()

        line = _PLACEHOLDER.sub(hashed, line)
        line = _PATTERN.sub(lambda m: f"{m.group(1)}{m.group(2)}{prefix}:", line)
        lines.append(line)
    return "\n".join(lines) + "\n", passwords


def url(role: str, password: str, host: str, port: int, tls: bool, ca: str) -> str:
    scheme = "rediss" if tls else "redis"
    query = f"?ssl_ca_certs={ca}" if tls and ca else ""
    return f"{scheme}://{role}:{password}@{host}:{port}/0{query}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder to write users.acl and <role>.env")
    ap.add_argument("--template", default=str(TEMPLATE))
    ap.add_argument("--prefix", default="so", help="the combiner's --prefix (default so)")
    ap.add_argument("--host", default="redis", help="Redis host in the URLs (default redis)")
    ap.add_argument("--port", type=int, default=6379)
    ap.add_argument("--tls", action="store_true", help="rediss:// URLs")
    ap.add_argument("--ca", default="", help="with --tls: CA file the clients trust")
    args = ap.parse_args(argv)
    text, passwords = render(pathlib.Path(args.template).read_text(), args.prefix)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "users.acl").write_text(text)
    for role, password in passwords.items():
        path = out / f"{role}.env"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(
                "COMBINER_REDIS_URL="
                + url(role, password, args.host, args.port, args.tls, args.ca)
                + "\n"
            )
    print(f"wrote {out / 'users.acl'} and {', '.join(f'{r}.env' for r in passwords)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
