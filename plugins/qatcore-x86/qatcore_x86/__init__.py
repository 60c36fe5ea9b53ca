"""The x86 preset for qatcore."""

from qatcore_x86.preset import X86_QCONFIG

__all__ = ["X86_QCONFIG"]
