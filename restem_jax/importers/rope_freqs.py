"""llama.cpp's `rope_freqs` tensor <-> Llama 3 ("llama3") RoPE scaling parameters.

llama.cpp keeps Llama 3.x's frequency-dependent RoPE scaling as one float32 tensor,
rope_freqs.weight, of head_dim / 2 factors, and divides each base inverse frequency
base^(-2i / head_dim) by its factor (ggml_rope_ext's freq_factors). Its converter
(convert_hf_to_gguf.py, LlamaModel.generate_extra_tensors) writes the llama3 rule of
transformers' _compute_llama3_parameters as factors: 1 for wavelengths below
original_max_len / high_freq_factor, `factor` above original_max_len / low_freq_factor,
1 / ((1 - s) / factor + s) between, s = (original_max_len / wavelength - low) / (high - low).

The file keeps only the factors. 1 / factor is a clipped line in 1 / wavelength, fixed by
`factor` (the largest factor) and the two threshold wavelengths; original_max_len only
scales low_freq_factor and high_freq_factor with it. `llama3_fields` recovers parameters
that give the same factors (a least-squares line through the blended ones; with fewer than
two blended, thresholds inside the gaps the others leave), original_max_len being the
converter's default 8192: an import gives equivalent parameters, not necessarily the
exported ones (so export's read-back compares factors, `freq_factors`).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from restem_jax import model as model_lib
from restem_jax.importers.common import ImportFormatError

TENSOR = "rope_freqs.weight"
ORIGINAL_MAX_LEN = 8192  # llama.cpp's converter default for original_max_position_embeddings.
FIELDS = ("rope_scaling", "rope_scaling_factor", "rope_low_freq_factor",
          "rope_high_freq_factor", "rope_original_max_len")
_TOL = 1e-6  # Float32 factors: a smooth factor this close to 0 or 1 is a threshold band's.
_RTOL = 1e-6  # Recovered parameters must reproduce every factor to this relative error.


def base_inv_freqs(base: float, head_dim: int) -> np.ndarray:
  """Unscaled RoPE inverse frequencies [head_dim / 2], float64."""
  return float(base) ** -(np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)


def _llama3(inv_F: np.ndarray, factor: float, low: float, high: float, orig: float
            ) -> np.ndarray:
  smooth_F = np.clip((orig * inv_F / (2 * math.pi) - low) / (high - low), 0.0, 1.0)
  return 1.0 / ((1.0 - smooth_F) / factor + smooth_F)


def freq_factors(cfg: model_lib.ModelConfig) -> np.ndarray:
  """llama.cpp's per-frequency divisors [head_dim / 2] (float64) of cfg's global RoPE."""
  inv_F = base_inv_freqs(cfg.rope_base, cfg.head_dim)
  if cfg.rope_scaling == "llama3":
    return _llama3(inv_F, cfg.rope_scaling_factor, cfg.rope_low_freq_factor,
                   cfg.rope_high_freq_factor, cfg.rope_original_max_len)
  return np.full_like(inv_F, cfg.rope_scaling_factor if cfg.rope_scaling == "linear" else 1.0)


def _thresholds(u_F: np.ndarray, s_F: np.ndarray) -> tuple[float, float]:
  """1 / threshold wavelengths (u_low < u_high) of smooth factors s_F at u_F = 1 / wavelength."""
  blended = (s_F > _TOL) & (s_F < 1 - _TOL)
  lo = u_F[s_F <= _TOL].max(initial=0.0)  # Slowed: u <= u_low.
  hi = u_F[s_F >= 1 - _TOL].min(initial=np.inf)  # Kept: u >= u_high.
  if blended.sum() >= 2:  # s = (u - u_low) / (u_high - u_low): a line.
    slope, icpt = np.polyfit(u_F[blended], s_F[blended], 1)
    return (-icpt / slope, (1 - icpt) / slope) if slope > 0 else (0.0, 0.0)
  if blended.sum() == 1:  # Widest band through the point, halved, inside the gaps.
    u, s = u_F[blended][0], s_F[blended][0]
    width = min((u - lo) / s, (hi - u) / (1 - s)) / 2
    return u - s * width, u + (1 - s) * width
  if np.isfinite(hi):
    return lo + (hi - lo) / 3, lo + 2 * (hi - lo) / 3
  return 2 * lo, 4 * lo  # Every frequency slowed.


def _short(x: float) -> float:
  """The 6-significant-digit decimal of x (1.0 rather than 0.9999998 from float32 factors)."""
  return float(f"{x:.6g}")


def llama3_fields(factors_F: np.ndarray, base: float, head_dim: int) -> dict[str, Any]:
  """ModelConfig RoPE fields whose factors are factors_F ({} when every factor is 1);
  ImportFormatError when no llama3 parameters give them."""
  r_F = np.asarray(factors_F, np.float64).reshape(-1)
  inv_F = base_inv_freqs(base, head_dim)
  if r_F.shape != inv_F.shape or not np.all(np.isfinite(r_F)) or r_F.min() <= 0:
    raise ImportFormatError(f"GGUF tensor {TENSOR} must hold {inv_F.size} positive factors "
                            f"(head_dim {head_dim} / 2); it holds {r_F.size}")
  if np.allclose(r_F, 1.0, rtol=0, atol=_TOL):
    return {}
  factor = float(str(np.float32(r_F.max())))
  if r_F.min() > 1 - _TOL and factor > 1 + _TOL:  # llama3 divisors lie in [1, factor].
    s_F = (1 / r_F - 1 / factor) / (1 - 1 / factor)
    u_low, u_high = _thresholds(inv_F / (2 * math.pi), s_F)
    orig = ORIGINAL_MAX_LEN
    for low, high in ((_short(orig * u_low), _short(orig * u_high)),
                      (orig * u_low, orig * u_high)):
      if 0 < low < high and np.allclose(_llama3(inv_F, factor, low, high, orig), r_F,
                                        rtol=_RTOL, atol=0):
        return dict(zip(FIELDS, ("llama3", factor, float(low), float(high), orig)))
  raise ImportFormatError(f"GGUF tensor {TENSOR} is not Llama 3 RoPE scaling (no factor, "
                          "low/high_freq_factor give its factors); not supported")
