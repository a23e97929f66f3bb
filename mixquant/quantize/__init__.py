"""Rounding methods beyond ggml's round-to-nearest: error-compensated rounding inside GGUF blocks.

    quantize(w, "Q4_K", H=None, importance=None) -> bytes   (mixquant.quantize.gptq)

The bytes are ordinary GGUF blocks; only the integer codes (and the block parameters fitted on
the error-updated weights) differ from llama-quantize's.
"""

from .gptq import METHODS, HessianQuantizer, output_error, quantize

__all__ = ["METHODS", "HessianQuantizer", "output_error", "quantize"]
