"""deepmd-kit's PyTorch backend for the benchmark, from a copy of the installed ``deepmd`` package.

The installed deepmd-kit ships its PyTorch operator library
(``deepmd/lib/libdeepmd_op_pt.so``) built for one torch release; with any
other torch, importing ``deepmd.pt`` raises at that library. Without the
library, deepmd-kit's PyTorch backend runs on plain torch operators (its
``ENABLE_CUSTOMIZED_OP`` is then False), and se_e2_a needs none of the custom
ones. So the benchmark copies the installed package, less that library, into
``--out/deepmd-pt/deepmd`` (once; reused while the installed package is not
newer) and puts ``--out/deepmd-pt`` first on the PYTHONPATH of the processes
that run the PyTorch backend. Nothing of the installed package is changed.

``deepmd.pt`` also imports ``e3nn`` (for descriptors the benchmark does not
use); when it is not installed, the PyTorch rows are skipped with a one-line
reason (``pip install e3nn`` brings it).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

# the torch-version-bound operator library left out of the copy
OP_LIBRARY = "libdeepmd_op_pt.so"
COPY_DIR = "deepmd-pt"


def installed_deepmd() -> Path | None:
    """The installed deepmd package's folder (None when deepmd-kit is not installed)."""
    spec = importlib.util.find_spec("deepmd")
    return Path(spec.origin).parent if spec and spec.origin else None


def e3nn_installed() -> bool:
    """Whether ``e3nn``, which ``deepmd.pt`` imports, can be imported here (and so in the measurements)."""
    return importlib.util.find_spec("e3nn") is not None


def newest_mtime(folder: Path) -> float:
    """The latest modification time of the package's files under folder (the copy is stale when the package is
    newer); compiled ``__pycache__`` files are left out: importing the package rewrites them."""
    return max((p.stat().st_mtime for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts),
               default=0.0)


def package_copy(out: Path) -> dict:
    """out/deepmd-pt/deepmd: the installed package without OP_LIBRARY, made once (kept while newer than it).

    Returns {"status": "ok" | "ok (cached)" | "skipped: why", "pythonpath": the folder to put first or None}.
    The copy is made in a temporary folder inside ``out`` and renamed into place, so an interrupted run
    leaves no half copy.
    """
    src = installed_deepmd()
    if src is None:
        return {"status": "skipped: deepmd-kit is not installed", "pythonpath": None}
    if not e3nn_installed():
        return {"status": "skipped: deepmd.pt imports e3nn, which is not installed (pip install e3nn)",
                "pythonpath": None}
    root = out / COPY_DIR
    target = root / "deepmd"
    if target.is_dir() and target.stat().st_mtime >= newest_mtime(src):
        return {"status": "ok (cached)", "pythonpath": str(root.resolve())}
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".copy-") as tmp:
        staged = Path(tmp) / "deepmd"
        shutil.copytree(src, staged, ignore=lambda _, names: [n for n in names if n in (OP_LIBRARY, "__pycache__")])
        if target.exists():
            shutil.rmtree(target)
        os.replace(staged, target)
    # the folder's time marks when the copy was made (checked against the package's files above)
    os.utime(target)
    return {"status": "ok", "pythonpath": str(root.resolve())}
