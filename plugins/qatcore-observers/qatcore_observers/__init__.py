"""Min/max, moving-average min/max and histogram observers for qatcore."""

from qatcore_observers.histogram import HistogramObserver
from qatcore_observers.minmax import MinMaxObserver, MovingAverageMinMaxObserver

__all__ = ["HistogramObserver", "MinMaxObserver", "MovingAverageMinMaxObserver"]
