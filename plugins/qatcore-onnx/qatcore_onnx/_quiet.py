"""Keeping torch.onnx.export's warnings and printed graphs out of the caller's output."""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator

import torch

__all__ = ["quiet_export"]


@contextlib.contextmanager
def quiet_export() -> Iterator[None]:
    """Silence torch.onnx.export's warnings, and its printed output unless the export succeeds."""
    with _warnings_filtered(), _native_output_held():
        yield


@contextlib.contextmanager
def _warnings_filtered() -> Iterator[None]:
    # torch 2.13 warns on every call that the TorchScript exporter is legacy
    # and that its ONNX logging setup will be removed. The tracer warns about
    # Python values it records as constants, such as the scales. All three are
    # about this exporter's own calls.
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="You are using the legacy TorchScript-based ONNX export"
        )
        warnings.filterwarnings(
            "ignore",
            category=DeprecationWarning,
            module=r"torch\.onnx\._internal\.torchscript_exporter",
        )
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        yield


def _flush_all() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    # C++ std::cout writes through C stdio, whose buffer must reach the file
    # descriptor before the descriptor is switched back.
    # Where the C library cannot be loaded by name (Windows), ctypes raises.
    with contextlib.suppress(OSError, AttributeError, TypeError):
        ctypes.CDLL(None).fflush(None)


@contextlib.contextmanager
def _native_output_held() -> Iterator[None]:
    """Send file descriptors 1 and 2 to temporary files, and replay them only on success.

    When torch.onnx.export fails, torch 2.13 prints its IR graph ("Torch IR
    graph at exception") to stdout from C++, because its setup_onnx_logging
    turns ONNX logging on and never off, so contextlib.redirect_stdout cannot
    catch it. The export raises in that case, and the caller reports the
    error, so the dump is dropped. Output of a successful export is written
    to the original descriptors unchanged.

    NOTE: the descriptors belong to the process, so output of other threads
    during the export is held too, and dropped with the dump when it fails.
    """
    _flush_all()
    with tempfile.TemporaryFile() as held_out, tempfile.TemporaryFile() as held_err:
        held_files = {1: held_out, 2: held_err}
        try:
            saved = {descriptor: os.dup(descriptor) for descriptor in held_files}
        except OSError:  # a process without stdout or stderr has nothing to keep clean
            yield
            return
        succeeded = False
        try:
            for descriptor, file in held_files.items():
                os.dup2(file.fileno(), descriptor)
            yield
            succeeded = True
        finally:
            _flush_all()
            for descriptor, original in saved.items():
                os.dup2(original, descriptor)
                os.close(original)
        if succeeded:
            for descriptor, file in held_files.items():
                file.seek(0)
                text = file.read()
                if text:
                    os.write(descriptor, text)
