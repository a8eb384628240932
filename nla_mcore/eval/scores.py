"""How well a reconstruction matches its vector: cos, `mse_nrm`, and FVE over a set (NLA.md).

    mse_nrm = mean_d (normalize(p, s) - normalize(g, s))^2      (s = mse_scale; None: raw MSE)
    FVE     = 1 - mean(mse_nrm) / baseline
    rawvar  = mean over the set of mean_d (normalize(g) - mean(normalize(g)))^2
    meannorm= the same about normalize(mean(normalize(g)))

`rawvar` is the baseline of every FVE this project prints unless it says otherwise: a
predictor that always answers the set's mean scores 0, a random direction below 0.  Scores run
in float64 on the host: sets are small and the numbers are reported, not trained on.
Legend: N vectors, D width.
"""

from __future__ import annotations

import numpy as np

BASELINES = ("rawvar", "meannorm")


def normalized(v_ND: np.ndarray, scale: float | None) -> np.ndarray:
    """Rows rescaled to norm `scale` (None: unchanged), in float64."""
    v_ND = np.asarray(v_ND, dtype=np.float64)
    if scale is None:
        return v_ND
    return v_ND / np.maximum(np.linalg.norm(v_ND, axis=-1, keepdims=True), 1e-12) * scale


def cosine(pred_ND: np.ndarray, target_ND: np.ndarray) -> np.ndarray:
    p, g = normalized(pred_ND, 1.0), normalized(target_ND, 1.0)
    return (p * g).sum(axis=-1)


def mse_nrm(pred_ND: np.ndarray, target_ND: np.ndarray, scale: float | None) -> np.ndarray:
    """Per row: the normalised MSE the AR is trained on (NLA.md "Vectors")."""
    return ((normalized(pred_ND, scale) - normalized(target_ND, scale)) ** 2).mean(axis=-1)


def baseline_variance(target_ND: np.ndarray, scale: float | None, kind: str = "rawvar") -> float:
    """FVE's denominator over the set `target_ND` (see the module docstring)."""
    if kind not in BASELINES:
        raise ValueError(f"FVE baseline must be one of {BASELINES}, got {kind!r}")
    g = normalized(target_ND, scale)
    centre = g.mean(axis=0)
    if kind == "meannorm":
        centre = normalized(centre[None, :], scale)[0]
    return float(((g - centre) ** 2).mean())


def fve(
    mean_mse_nrm: float, target_ND: np.ndarray, scale: float | None, kind: str = "rawvar"
) -> float:
    """Fraction of variance explained, against the `kind` baseline of `target_ND` (NaN for a
    set without variance, e.g. a single vector)."""
    variance = baseline_variance(target_ND, scale, kind)
    return 1.0 - mean_mse_nrm / variance if variance > 0 else float("nan")
