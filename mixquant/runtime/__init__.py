"""Running a model: one decoder block in memory at a time (`StreamedModel`), the hidden states
between blocks within the memory budget (`HiddenStates`), and the executors that spread
independent work items over processes or machines (`executor`). Calibration, analysis and
evaluation all run their forward passes through it."""

from .memory import available_memory, budget_from, format_size, parse_size, peak_rss
from .model import RowSlices, StreamedModel, Values, resolve_device
from .states import HiddenStates

__all__ = ["StreamedModel", "RowSlices", "Values", "HiddenStates", "resolve_device", "available_memory", "budget_from", "format_size",
           "parse_size", "peak_rss"]
