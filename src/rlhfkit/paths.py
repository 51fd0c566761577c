"""Where rlhfkit keeps things that outlive a run, and how files are written atomically."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import platformdirs


def cache_root() -> Path:
    """User cache for converted models and tokenized data; RLHFKIT_CACHE overrides it."""
    root = os.environ.get("RLHFKIT_CACHE") or platformdirs.user_cache_dir("rlhfkit")
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def require_dir(path: str | os.PathLike, setting: str) -> Path:
    """mkdir -p, or a user error naming the setting and the path when it (or a dir above it) is a file."""
    from .errors import ConfigError

    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), path)
        raise ConfigError(f"{setting} {path}: {blocker} is a file, not a directory; set {setting} to a "
                          "directory") from None
    return path


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_listing(root: Path, names) -> dict[str, dict]:
    """Size and SHA-256 of each file (names relative to root): written after the files, as a record of
    what was written that `listing_problem` checks them against later."""
    return {str(n): {"size": (Path(root) / n).stat().st_size, "sha256": file_sha256(Path(root) / n)} for n in names}


def listing_problem(root: Path, listing: dict, hashes: bool = True) -> str | None:
    """None when every file of a `file_listing` is there with its size (and SHA-256); else what is wrong
    with the first that is not."""
    for name, want in listing.items():
        path = Path(root) / name
        if not isinstance(want, dict):
            return f"the listing of {name} is not valid"
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != want.get("size"):
            return f"{name} has {path.stat().st_size} bytes, {want.get('size')} were written"
        if hashes and file_sha256(path) != want.get("sha256"):
            return f"{name} does not match its SHA-256"
    return None


def link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Put src's content at dst as a hard link (a copy across filesystems), replacing dst atomically."""
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() and os.path.samefile(src, dst):
        return  # already linked (rename() between two links to one file would do nothing and leave tmp behind)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def publish_dir(tmp: Path, final: Path) -> None:
    """Move a fully written temp dir into place. Readers see the old dir or the new one, never half of one."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def make_temp_dir(final: Path) -> Path:
    """A temp dir beside `final` (same filesystem, so publish_dir's rename is atomic), with the permissions
    a plain mkdir would give (mkdtemp makes it owner-only, and the rename would publish that)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    tmp.chmod(0o777 & ~current_umask())
    return tmp


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp's file is owner-only
    os.replace(tmp, path)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
