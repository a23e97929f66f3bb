"""Activation quantization (W8A8 and friends) measured on a model: why outlier activations break
post-training quantization, and what per-token, per-channel and block-wise scales, LLM.int8() and
SmoothQuant change.

    schemes      the fake quantizers (pure torch) and the scheme names
    stats        streaming calibration statistics of each linear input (static ranges)
    runner       forward pre-hooks / weight parametrizations on the Evaluator's model
    sensitivity  per-input damage, the allocation of full-precision inputs, rank correlations
    study        `actquant()`: the whole table as one `ActQuantResult`; `format_table`
    report       its HTML page and the section `mixquant analyze --actquant` embeds
"""

from .schemes import DEFAULT_SCHEMES, Scheme, parse_scheme
from .study import ActQuantResult, Row, actquant, format_table

__all__ = ["DEFAULT_SCHEMES", "Scheme", "parse_scheme", "ActQuantResult", "Row", "actquant", "format_table"]
