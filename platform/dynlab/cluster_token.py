"""The Ray auth token of a launched cluster, created once on the user's machine.

``python -m dynlab.cluster_token`` writes a random token to ``~/.ray/auth_token`` (mode 0600) unless
one is there already. That is the file Ray's clients on this machine read (``ray job submit``,
``ray status``), and the one ``cluster.yaml`` copies to every node through its ``file_mounts``, where
``ray start`` finds it at the same default path. The token is never printed: it is a password to
the cluster (whoever holds it can run code there).
"""

from __future__ import annotations

import os
import secrets
import stat
import sys
from pathlib import Path

DEFAULT_PATH = "~/.ray/auth_token"  # Ray's default token file, on the user's machine and on every node


def ensure_token(path: str | os.PathLike = DEFAULT_PATH) -> tuple[Path, bool]:
    """``(the token file, whether it was created now)``. An existing non-empty file is kept (a
    running cluster uses it) with its mode narrowed to 0600; a missing or empty one gets a fresh
    256-bit token, written with mode 0600 from the start."""
    path = Path(path).expanduser()
    if path.is_file() and path.stat().st_size > 0:
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            path.chmod(0o600)
        return path, False
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.unlink(missing_ok=True)  # an empty file: Ray would take it for no token
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return path, True


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path, created = ensure_token(argv[0] if argv else DEFAULT_PATH)
    print(f"{'created' if created else 'kept the existing'} Ray auth token {path} (mode 0600; not shown). "
          "cluster.yaml copies it to every node (file_mounts); keep it out of the repository.")
    other_path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    shadowing = ["RAY_AUTH_TOKEN"] * bool(os.environ.get("RAY_AUTH_TOKEN"))
    shadowing += ["RAY_AUTH_TOKEN_PATH"] * bool(other_path and Path(other_path).expanduser().resolve() != path.resolve())
    if shadowing:
        print(f"note: {', '.join(shadowing)} is set in this shell and takes precedence over the file for Ray clients here; "
              f"unset it to submit jobs to the cluster", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
