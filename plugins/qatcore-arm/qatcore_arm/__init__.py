"""The arm preset for qatcore, and its int8 converter for PyTorch's qnnpack engine."""

from qatcore_arm.preset import ARM_QCONFIG

__all__ = ["ARM_QCONFIG"]
