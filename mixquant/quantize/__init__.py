"""Rounding methods beyond ggml's round-to-nearest: error-compensated rounding inside GGUF blocks.

    quantize(w, "Q4_K", H=None, importance=None) -> bytes   (mixquant.quantize.gptq)
    search_scales(source, types, hessians, importance) -> AwqScales   (mixquant.quantize.awq: a weight
        transform folded into the model before rounding, applied by ScaledSource as export reads)

The bytes are ordinary GGUF blocks; only the integer codes (and the block parameters fitted on
the error-updated weights) differ from llama-quantize's.
"""

from .gptq import METHODS, GptqOptions, HessianQuantizer, output_error, quantize

__all__ = ["METHODS", "GptqOptions", "HessianQuantizer", "output_error", "quantize"]
