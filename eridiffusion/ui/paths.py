"""Every path the UI reads or writes is resolved and must stay under its root.

A request names a path relative to the root (`data/img.png`) or absolute inside it. `..`
anywhere, an absolute path elsewhere and a symlink whose target leaves the root are refused
(`PathRefused`, HTTP 403); a malformed name (NUL byte, empty) is `BadPath` (HTTP 400).
"""

from __future__ import annotations

import os
from pathlib import Path

from eridiffusion.errors import UserError


class BadPath(UserError, ValueError):
    """A path that is not a path (empty, NUL byte)."""


class PathRefused(UserError, PermissionError):
    """A path outside the UI's root."""


class Root:
    """The folder the UI may touch; `resolve(name)` is the only way to a path inside it."""

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder).resolve()

    def resolve(self, name: str | os.PathLike, must_exist: bool = False) -> Path:
        """The resolved path of `name` (relative to the root, or absolute inside it)."""
        text = os.fspath(name)
        if not text or "\0" in text:
            raise BadPath(f"{text!r} is not a path: give a path under {self.path}")
        given = Path(text)
        if ".." in given.parts:
            raise PathRefused(f"{text}: '..' is not allowed; give a path under {self.path}")
        resolved = (given if given.is_absolute() else self.path / given).resolve()
        if not self.contains(resolved):
            raise PathRefused(f"{text} resolves to {resolved}, outside the UI root {self.path}")
        if must_exist and not resolved.exists():
            raise FileNotFoundError(f"{text}: not found under {self.path}")
        return resolved

    def contains(self, resolved: Path) -> bool:
        return resolved == self.path or self.path in resolved.parents

    def relative(self, path: str | os.PathLike) -> str:
        """`path` relative to the root, with forward slashes ('.' for the root itself)."""
        path = Path(path)
        inside = path if path.is_absolute() and self.contains(Path(os.path.normpath(path))) else path.resolve()
        return inside.relative_to(self.path).as_posix()
