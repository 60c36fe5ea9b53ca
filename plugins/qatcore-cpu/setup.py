"""Build the plugin's native loops as an optional C extension.

The project's metadata lives in pyproject.toml; this file only declares the
extension. It is optional: where no C compiler is found, or the compile
fails, pip still installs the plugin, and the kernel runs its ATen path
instead. ``qatcore plugins`` and ``qatcore_cpu.native.status()`` then say
why the native loops are missing.
"""

import sys

from setuptools import Extension, setup

# Floating-point contraction would fuse a product and a sum into one
# rounding and change results against the ATen ops; it stays off.
compile_args = [] if sys.platform == "win32" else ["-O3", "-ffp-contract=off"]

setup(
    ext_modules=[
        Extension(
            "qatcore_cpu._native",
            sources=["qatcore_cpu/_native.c"],
            extra_compile_args=compile_args,
            optional=True,
        )
    ]
)
