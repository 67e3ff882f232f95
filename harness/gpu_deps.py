"""What ``harness.gpu_check`` needs beyond PyTorch, transformers and pyarrow, into build/gpu-deps.

    make gpu-deps        # here, where PyPI is reachable; the folder then travels with the tree

``common/``: pure-Python packages (and psutil, whose compiled part is abi3) copied from this
``.venv``, DeepSpeed as installed there (its ops are built at run time, if ever); ``cpXY/``:
pydantic's compiled core for CPython 3.10-3.13 (this Python's copied, the others downloaded as
manylinux wheels). ``harness.gpu_check`` puts both on its path.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

from harness.gpu_check import DEPS

COPIED = ("deepspeed", "pydantic", "annotated_types", "typing_inspection", "typing_extensions",
          "hjson", "einops", "cpuinfo", "packaging", "msgpack", "psutil", "ninja")  # fmt: skip
PYTHONS = ("3.10", "3.11", "3.12", "3.13")


def _copy(name: str, site: Path, dest: Path) -> None:
    src = site / name
    if src.is_dir():
        shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    elif (site / f"{name}.py").is_file():
        shutil.copy2(site / f"{name}.py", dest / f"{name}.py")
    else:
        raise SystemExit(f"{name} is not installed in this environment; run `make install` first")


def main() -> None:
    import pydantic_core

    site = Path(sysconfig.get_paths()["purelib"])
    if DEPS.exists():
        shutil.rmtree(DEPS)
    common = DEPS / "common"
    common.mkdir(parents=True)
    for name in COPIED:
        _copy(name, site, common)
    core = pydantic_core.__version__
    for py in PYTHONS:
        tag = "cp" + py.replace(".", "")
        dest = DEPS / tag
        dest.mkdir()
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
                 "--no-deps", "--only-binary=:all:", "--platform", "manylinux2014_x86_64",
                 "--implementation", "cp", "--python-version", py, "-d", tmp,
                 f"pydantic-core=={core}"],
                check=True,
            )  # fmt: skip
            (wheel,) = Path(tmp).glob("pydantic_core-*.whl")
            with zipfile.ZipFile(wheel) as z:
                z.extractall(dest)
    size = sum(f.stat().st_size for f in DEPS.rglob("*") if f.is_file())
    print(f"{DEPS}: {size / 2**20:.1f} MiB ({', '.join(COPIED)}; pydantic-core {core} for "
          f"{', '.join(PYTHONS)})")  # fmt: skip


if __name__ == "__main__":
    main()
