"""Entry point of the qatcore-observers plugin."""

from __future__ import annotations

from qatcore import Registry, hookimpl
from qatcore_observers.histogram import HistogramObserver
from qatcore_observers.minmax import MinMaxObserver, MovingAverageMinMaxObserver


@hookimpl
def qatcore_register_observers(registry: Registry) -> None:
    registry.register_observer("minmax", MinMaxObserver)
    registry.register_observer("moving_average_minmax", MovingAverageMinMaxObserver)
    registry.register_observer("histogram", HistogramObserver)
