"""The repository's `kernels/` folder never shadows Hugging Face's `kernels` package (which transformers imports),
from the repository root, while it is still installed as `nlsr_fast.kernels` from a wheel and from an editable
install. Each check runs in a child process started in the repository root, as a user's `python -c`, `python -m`
and pytest would be."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path, PurePosixPath

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The package's own files: what a build of it reads.
SOURCES = ("pyproject.toml", "setup.py", "README.md", "nlsr_fast", "kernels")

pytest.importorskip("kernels", reason="Hugging Face's kernels package is what could be shadowed")
_installed_kernels = Path(__import__("kernels").__file__).resolve()
assert _installed_kernels.parent != ROOT / "kernels", "this process imported the repository's kernels/ as `kernels`"


def _python(code: str, cwd: Path, *flags: str) -> str:
    run = subprocess.run([sys.executable, *flags, "-c", code], cwd=cwd, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ""})
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def test_transformers_imports_from_the_repository_root() -> None:
    out = _python("import transformers.modeling_utils, kernels; print(kernels.__file__)", ROOT)
    assert Path(out.strip()).resolve() == _installed_kernels
    # The repository's own modules are not reachable under the top-level name either.
    _python("import importlib, kernels\ntry:\n    importlib.import_module('kernels._common')\n"
            "except ModuleNotFoundError:\n    pass\nelse:\n    raise SystemExit('kernels._common imported')", ROOT)


def test_a_symlinked_repository_root_is_skipped_too(tmp_path: Path) -> None:
    # The root under a second spelling on sys.path must not be searched again (that loaded this file without end).
    (tmp_path / "root").symlink_to(ROOT)
    code = (f"import sys; sys.path.insert(0, {str(tmp_path / 'root')!r})\n"
            "import transformers.modeling_utils, kernels; print(kernels.__file__)")
    assert Path(_python(code, ROOT).strip()).resolve() == _installed_kernels


def test_without_an_installed_kernels_the_folder_is_not_a_package(tmp_path: Path) -> None:
    # -I -S: no site-packages, so no Hugging Face kernels; the repository root is first on sys.path, a symlinked
    # spelling of it second.
    (tmp_path / "root").symlink_to(ROOT)
    code = (f"import sys; sys.path[:0] = [{str(ROOT)!r}, {str(tmp_path / 'root')!r}]\ntry:\n    import kernels\n"
            "except ModuleNotFoundError as e:\n    print(e)\nelse:\n    raise SystemExit(kernels.__file__)")
    out = _python(code, ROOT, "-I", "-S")
    assert "nlsr_fast.kernels" in out and "No module named 'kernels'" in out


def test_python_m_from_the_repository_root() -> None:
    run = subprocess.run([sys.executable, "-m", "nlsr_fast", "demo", "--help"], cwd=ROOT, capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "usage:" in run.stdout


def _build(kind: str, tmp: Path) -> Path:
    """The package built by setuptools' PEP 517 backend from a copy of its sources (no C++ extension: the layout
    is what is checked), as pip would build it."""
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        else:
            shutil.copy2(ROOT / name, src / name)
    code = f"from setuptools import build_meta as b; print(b.build_{kind}({str(tmp / 'dist')!r}))"
    run = subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True, text=True,
                         env={**os.environ, "NLSR_FAST_NO_EXT": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    return tmp / "dist" / run.stdout.strip().splitlines()[-1]


def _import_installed(site: Path, cwd: Path) -> list[str]:
    """From `cwd`, import transformers, kernels and nlsr_fast.kernels with the site directory `site` first and this
    environment's dependencies after it (without this environment's own nlsr_fast install: -S, no .pth files)."""
    deps = [p for p in sys.path if p.endswith("site-packages")]
    code = (f"import sys, site; site.addsitedir({str(site)!r}); sys.path += {deps!r}\n"
            "import transformers.modeling_utils, kernels, nlsr_fast, nlsr_fast.kernels.extrapolate as e\n"
            "print(kernels.__file__); print(nlsr_fast.__file__); print(e.__file__)")
    return _python(code, cwd, "-S").split()


#: the library's subpackages, the whole of what the wheel ships besides nlsr_fast/*.py
PACKAGES = ("bench", "calib", "demo", "io", "kernels", "methods", "ops", "pipeline")


def test_wheel_installs_kernels_as_nlsr_fast_kernels(tmp_path: Path) -> None:
    pytest.importorskip("triton")
    wheel = _build("wheel", tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    assert "nlsr_fast/kernels/__init__.py" in names and "nlsr_fast/kernels/extrapolate.py" in names
    assert not [n for n in names if n.startswith("kernels/")]
    # the library and nothing else: the experiment's code (benches/e2e), the benches and the tests stay out
    folders = {str(PurePosixPath(n).parent) for n in names} - {n.split("/")[0] for n in names if ".dist-info/" in n}
    assert folders == {"nlsr_fast", *(f"nlsr_fast/{p}" for p in PACKAGES)}
    assert "nlsr_fast/evaluation.py" in names and "nlsr_fast/stats.py" in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    # From a neutral folder: from a source checkout's root, `nlsr_fast` would be the checkout's own folder.
    hf, pkg, ext = _import_installed(site, tmp_path)
    assert Path(hf).resolve() == _installed_kernels
    assert Path(pkg) == site / "nlsr_fast" / "__init__.py"
    assert Path(ext) == site / "nlsr_fast" / "kernels" / "extrapolate.py"


def test_editable_install_maps_the_folder_to_nlsr_fast_kernels(tmp_path: Path) -> None:
    pytest.importorskip("triton")
    wheel = _build("editable", tmp_path)
    site, src = tmp_path / "site", tmp_path / "src"
    zipfile.ZipFile(wheel).extractall(site)
    for cwd in (src, tmp_path):  # the editable checkout's root, and elsewhere (there the install's finder maps it)
        hf, pkg, ext = _import_installed(site, cwd)
        assert Path(hf).resolve() == _installed_kernels
        assert Path(pkg) == src / "nlsr_fast" / "__init__.py"
        assert Path(ext) == src / "kernels" / "extrapolate.py"
