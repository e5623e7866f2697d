"""Choose a writable Numba cache directory before any kernel module is imported.

Numba's own locators fail at import time when the package directory and $HOME are read-only,
and they ignore callee edits in other modules (numba.md §4). We therefore point NUMBA_CACHE_DIR at
``<base>/numba-<numba version>-<hash of edgeformer/kernels/*.py>``: an edit to any kernel file gives a
fresh directory, and a read-only install still runs (with caching off if nothing is writable).
"""
import hashlib
import os
import tempfile
from pathlib import Path

KERNEL_DIR = Path(__file__).parent / "kernels"


def kernel_source_hash() -> str:
    digest = hashlib.sha1()
    for path in sorted(KERNEL_DIR.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def _writable(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".probe", delete=True)
        probe.close()
        return True
    except OSError:
        return False


def _candidates():
    if os.environ.get("EDGEFORMER_CACHE_DIR"):
        yield Path(os.environ["EDGEFORMER_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        yield Path(xdg) / "edgeformer"
    yield Path.home() / ".cache" / "edgeformer"
    yield Path(tempfile.gettempdir()) / f"edgeformer-{os.getuid() if hasattr(os, 'getuid') else 'user'}"


def setup_numba_cache() -> bool:
    """Set NUMBA_CACHE_DIR (unless the user set it) and return whether caching can be used."""
    user_dir = os.environ.get("NUMBA_CACHE_DIR")
    if user_dir:
        return _writable(Path(user_dir))
    import numba  # noqa: F401  (version only; kernels are not imported yet)

    tag = f"numba-{numba.__version__}-{kernel_source_hash()}"
    for base in _candidates():
        target = base / tag
        if _writable(target):
            os.environ["NUMBA_CACHE_DIR"] = str(target)
            numba.config.CACHE_DIR = str(target)
            return True
    return False


def base_cache_dir() -> Path | None:
    """Where edgeformer keeps its own caches (converted models of the demo, Numba kernels)."""
    for base in _candidates():
        if _writable(base):
            return base
    return None


CACHE_ENABLED = setup_numba_cache()
