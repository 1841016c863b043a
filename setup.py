"""Build nlsr_fast._C (torch-free C++ core) with CMake + pybind11 + ninja.

NLSR_FAST_NO_EXT=1 gives a pure-Python install; DEBUG=1 builds Debug.
Follows pybind11's cmake_example: https://github.com/pybind/cmake_example
"""

import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11  # lazy: only the build environment needs it

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_type = "Debug" if os.environ.get("DEBUG", "0") == "1" else "Release"
        build_temp = Path(self.build_temp) / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        cmake_args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}{os.sep}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={build_type}",
            "-GNinja",
        ]
        cmake_args += [a for a in os.environ.get("CMAKE_ARGS", "").split() if a]
        subprocess.run(["cmake", str(ROOT), *cmake_args], cwd=build_temp, check=True)
        subprocess.run(["cmake", "--build", ".", "-j", str(os.cpu_count() or 2)], cwd=build_temp, check=True)


ext_modules = [] if os.environ.get("NLSR_FAST_NO_EXT", "0") == "1" else [CMakeExtension("nlsr_fast._C")]

setup(
    # `kernels/` at the top level is installed as `nlsr_fast.kernels` (a PyPI package named `kernels` exists).
    packages=find_packages(include=["nlsr_fast", "nlsr_fast.*"]) + ["nlsr_fast.kernels"],
    package_dir={"nlsr_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": CMakeBuild},
)
