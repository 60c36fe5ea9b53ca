"""Warning classes of qatcore."""

from __future__ import annotations

__all__ = ["CoverageWarning", "QatcoreWarning"]


class QatcoreWarning(UserWarning):
    """Base class of every warning qatcore issues."""


class CoverageWarning(QatcoreWarning):
    """Modules stay float because no installed plugin maps their type."""
