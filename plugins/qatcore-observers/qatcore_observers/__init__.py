"""Min/max and moving-average min/max observers for qatcore."""

from qatcore_observers.minmax import MinMaxObserver, MovingAverageMinMaxObserver

__all__ = ["MinMaxObserver", "MovingAverageMinMaxObserver"]
