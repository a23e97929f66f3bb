"""Sensitivity analysis: what storing each tensor in each type costs, in bytes and in damage.

    sens = analyze(source, imatrix, text="calib.txt")     # a few minutes on the 135M test model
    sens.save("sensitivity.json")
    sens = Sensitivity.load("sensitivity.json")
    sens.damage("blk.3.ffn_down.weight", "Q4_K")           # expected KLD (nats/token) from that one tensor

For every tensor that llama-quantize would quantize (`plan.allows_quantization`) and every type
mixquant can write whose block divides its row length, two numbers:

* **predicted error**: the importance-weighted squared quantization error, normalised by the
  weighted energy of the tensor,

      predicted(t, type) = sum_ij imp_j (w_ij - q(w)_ij)^2  /  sum_ij imp_j w_ij^2

  where `imp` is the tensor's importance vector (the imatrix's mean squared activation per input
  column; all ones for a tensor the imatrix does not cover, e.g. the token embedding) and `q(w)`
  is `dequantize(quantize(w, type, imp))`, exactly the values `export.write_gguf` would write.
  Cheap: one quantization per pair, no forward pass.

* **measured damage**: the KL divergence (nats per token, mean over scored tokens) of the model's
  next-token distribution when *only that tensor* is quantized to that type, everything else in
  float32, on windows held out from the calibration text (by default its last windows: an
  imatrix is normally computed on the first chunks). Computed incrementally on the streaming
  runtime (`mixquant.runtime`): the float32 model runs once over all windows, one block at a time,
  keeping the hidden state entering every block and the reference logits of the scored positions;
  then one work item per unit (the token embedding, each block, the head) quantizes that unit's
  tensors to every candidate type and carries all its measured candidates (and the layer sweep's
  whole-block variants) from the unit's cached input through the rest of the model together: a
  candidate's own block runs with its weight swapped in, every later block once per chunk of
  candidates, their hidden states in one batch (the token embedding, tied to the output, is
  swapped at both ends). The numbers are bit for bit those of one rerun per candidate.

Budget: on 2 CPU cores a rerun costs ~1-3 s for 512 tokens (blocks l..L-1 plus the 49152-word
output layer), so measuring all ~1900 (tensor, type) pairs of the test model would take about an
hour. The default (`measure="probe"`) therefore measures a calibrating subset and fits a model
of the rest:

    damage(t, type) = scale_t * factor(category(t), type) * basis(t, type)

where the basis is the Fisher estimate below when it was computed (`fisher=True`), else the
predicted error (`Sensitivity.basis`):

* every tensor is measured at two *probe* types, Q4_0 and Q5_1 (both fit every row length; one
  at the cheap end of the range allocations use, one in the middle), which fixes `scale_t`, how
  much the rest of the network amplifies that tensor's error: to second order the KLD is
  proportional to the error, with a tensor-specific factor the imatrix cannot know;
* a validation subset (`validate`; by default token_embd/output and all tensors of blocks n/2 and
  n-1) is measured at every quantized type. Per category (attn_v, ffn_down, ...), how much more or
  less damage each type does than the first probe per unit of predicted error, averaged over the
  tensors measured at both and shrunk towards 1 when they disagree, is `factor`. It matters: on
  the test model Q4_1/Q5_1 do 3-4x less damage to attn_v than their weighted squared error
  suggests next to Q4_0/Q5_0;
* measured pairs are used as measured. `Sensitivity.fit_report()` checks the model on the
  validation tensors, each one left out of the factors it is checked against.

`measure="all"` measures every pair; `measure="none"` only predicts (the damage is then the
predicted error itself, in its own units). A full probe analysis of the 135M test model (2
windows of 256 tokens, 446 scored) takes about 10 minutes on one busy CPU core.

Weights are quantized in GGUF orientation (`source.tensor`) and mapped to the transformers layout
for the forward pass (llama's q/k rows un-permuted), so the measured variant is bit for bit the
tensor a GGUF written with the same types and importance would hold.

Optional extras, each a stage of its own (timed in `settings["seconds_*"]`):

* **Fisher estimate** (`fisher=True`): the empirical Fisher diagonal F from one backward pass per
  held-out window, and per (tensor, type) the second-order estimate of the loss increase

      fisher(t, type) = 0.5 * sum_ij F_ij (w_ij - q(w)_ij)^2           (nats/token, like the KLD)

  F_ij = T * mean over windows of (dL/dw_ij)^2, with L the mean next-token cross-entropy over the
  window's T scored tokens: the squared gradient of a mean of T terms is ~1/T of the per-token
  squared gradient (the Fisher the KLD's second-order expansion uses) when the tokens' gradients
  are uncorrelated, so the factor T puts the estimate in per-token units (on the test model, on
  the windows the KLD is measured on, it is a median 1.3x the KLD, Spearman 0.97 within a type). 9 s on the test model
  with the default windows, one thread.
* **layer sweep** (`layer_sweep_types`, e.g. `DEFAULT_SWEEP_TYPES`): every quantizable tensor of
  one block quantized to a type (llama.cpp's shape fallback where its block does not fit the row),
  everything else float32; the KLD and the perplexity of each (block, type), against the float32
  reference perplexity. 77 s for 30 blocks x 2 types on the test model, one thread.

**Rounding method** (`method`): every candidate above (the predicted error, the Fisher estimate's
w - q(w), the measured swap, the layer sweep) is quantized the way `mixquant quantize --method`
would write it: "rtn" (default, ggml's round-to-nearest) or "gptq" (`quantize.gptq`: error
feedback through the Hessians of the same calibration, one factor of H^-1 per input shared by
q/k/v, by gate/up and by every type). Under "gptq" the predicted error is H-weighted,
tr((W-Q) H (W-Q)^T) / tr(W H W^T) (the same number as above for a diagonal H), since the
diagonal cannot see GPTQ's correlated errors. `settings["method"]` records it ("rtn" for files
without it), and an allocation (`quantize --target-*`) refuses a sensitivity of another method.

`rank_correlation(sens, kind)` says how well a cheap score (predicted error, Fisher) ranks the
measured KLDs (Spearman's rho).

The file (`Sensitivity.save`, schema "mixquant.sensitivity/2"), JSON:

    {
      "schema": "mixquant.sensitivity/2",
      "model": {"arch": "llama", "n_layer": 30, "n_elements": 134515008, "source": "<path>"},
      "settings": {...how it was measured: windows, ctx, score_from, tokens, imatrix, probe
                   types, validate, threads, seconds per stage, fit (fit_report()),
                   method ("rtn" | "gptq"; with gptq also damp and the hessians file)...},
      "reference": {"nll": 2.71, "ppl": 15.0} | null,   # float32 model on the scored tokens
      "type_factors": {"attn_v": {"Q4_0": 1.0, "Q5_1": 0.31, ...}, ...},   # per category
      "tensors": {
        "<gguf tensor name>": {
          "shape": [rows, cols],              # numpy order, as plan.TensorInfo.shape
          "fixed": false,                      # true: not quantizable, kept in its only type
          "scale": 1.23e-2 | null,             # fitted scale_t (null: nothing measured)
          "types": {
            "<type>": {"bytes": 123456,        # tensor data bytes in this type
                       "predicted": 1.5e-3,    # normalised importance-weighted squared error
                       "measured": 2.0e-5 | null,   # KLD nats/token, null when not measured
                       "fisher": 1.8e-5 | null}     # Fisher estimate, null when not computed
          },
          "weights": {"count", "absmax", "mean", "std", "kurtosis", "outlier_fraction",
                      "hist_edges", "hist_counts"} | null   # calibrate.Distribution of its values
        }, ...
      },
      "layer_sweep": [                         # empty when not run
        {"layer": 0, "type": "Q4_0", "kld": 0.012, "ppl": 15.2,
         "delta_ppl": 0.013,                   # ppl / reference ppl - 1
         "types_used": {"blk.0.attn_q.weight": "Q4_0", ...}}, ...
      ]
    }

A reader must reject another schema string; later versions of this schema add fields only under
a new name. Files of "mixquant.sensitivity/1" (the same without "fisher", "reference" and
"layer_sweep") are still read.

The package: `sensitivity` (the data, the fit, rank correlations), `measure` (the incremental
runner and the swap-and-rerun measurer), `run` (`analyze`: the orchestration of the stages).
"""

from .measure import _Runner  # noqa: F401 - the runner, for tests and benchmarks
from .run import (
    DEFAULT_CTX,
    DEFAULT_PROBES,
    DEFAULT_SWEEP_TYPES,
    DEFAULT_WINDOWS,
    analyze,
)
from .sensitivity import (
    SCHEMA,
    LayerResult,
    Sensitivity,
    TensorSensitivity,
    TypeCost,
    candidate_types,
    predicted_error,
    rank_correlation,
    scored_pairs,
    spearman,
)

__all__ = [
    "SCHEMA",
    "TypeCost",
    "TensorSensitivity",
    "LayerResult",
    "Sensitivity",
    "analyze",
    "candidate_types",
    "predicted_error",
    "rank_correlation",
    "scored_pairs",
    "spearman",
    "DEFAULT_WINDOWS",
    "DEFAULT_CTX",
    "DEFAULT_PROBES",
    "DEFAULT_SWEEP_TYPES",
]
