"""Build the plugin's native loops as an optional C extension.

The project's metadata lives in pyproject.toml; this file only declares the
extension. It is optional: where no C compiler is found, or the compile
fails, pip still installs the plugin without it, and the kernel runs its
ATen path instead. ``qatcore plugins`` and ``qatcore_cpu.native.status()``
then give the reason.
"""

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class BuildNativeLoops(build_ext):
    """build_ext that deletes an earlier build's library before it compiles.

    pip builds a local folder in place and reuses its ``build`` directory.
    A failed compile of an optional extension would leave the library of
    an earlier build there, to be installed as if it were current.
    """

    def build_extension(self, ext: Extension) -> None:
        path = self.get_ext_fullpath(ext.name)
        if os.path.exists(path):
            os.remove(path)
        super().build_extension(ext)


# Floating-point contraction would fuse a product and a sum into one
# rounding and change results against the ATen ops, so it stays off.
compile_args = [] if sys.platform == "win32" else ["-O3", "-ffp-contract=off"]

setup(
    cmdclass={"build_ext": BuildNativeLoops},
    ext_modules=[
        Extension(
            "qatcore_cpu._native",
            sources=["qatcore_cpu/_native.c"],
            extra_compile_args=compile_args,
            optional=True,
        )
    ],
)
