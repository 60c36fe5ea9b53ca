"""Min/max observers, per-tensor or per-channel as the spec's axis selects."""

from __future__ import annotations

import torch

from qatcore import QuantSpec, RangeObserver

__all__ = ["MinMaxObserver", "MovingAverageMinMaxObserver"]


class MinMaxObserver(RangeObserver):
    """Keep the smallest min and largest max of every batch seen."""

    def update(
        self, batch_min: torch.Tensor, batch_max: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.minimum(self.min_val, batch_min), torch.maximum(self.max_val, batch_max)


class MovingAverageMinMaxObserver(RangeObserver):
    """Track an exponential moving average of each batch's min and max.

    The first batch sets the range; each later batch moves it by
    ``averaging_constant`` times the difference, as
    ``torch.ao.quantization.MovingAverageMinMaxObserver`` does.

    Args:
        averaging_constant: Weight of the newest batch, in (0, 1].
    """

    def __init__(
        self, spec: QuantSpec, channels: int | None = None, *, averaging_constant: float = 0.01
    ) -> None:
        if isinstance(averaging_constant, bool) or not isinstance(averaging_constant, (int, float)):
            raise ValueError(
                f"averaging_constant must be a number in (0, 1], got {averaging_constant!r}"
            )
        if not 0 < averaging_constant <= 1:
            raise ValueError(f"averaging_constant must be in (0, 1], got {averaging_constant}")
        super().__init__(spec, channels)
        self.averaging_constant = float(averaging_constant)

    def update(
        self, batch_min: torch.Tensor, batch_max: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        observed = self.min_val <= self.max_val
        moved_min = self.min_val + self.averaging_constant * (batch_min - self.min_val)
        moved_max = self.max_val + self.averaging_constant * (batch_max - self.max_val)
        return torch.where(observed, moved_min, batch_min), torch.where(
            observed, moved_max, batch_max
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, averaging_constant={self.averaging_constant}"
