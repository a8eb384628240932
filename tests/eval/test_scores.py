"""The scores every figure is reported in (NLA.md "Vectors"): hand-checkable cases, because
the critic, the SFT evaluation and the transcripts all print these numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nla_mcore.eval.scores import baseline_variance, cosine, fve, mse_nrm, normalized


def test_mse_nrm_is_two_minus_two_cos_at_sqrt_d():
    rng = np.random.default_rng(0)
    p, g = rng.standard_normal((5, 16)) * 30, rng.standard_normal((5, 16))
    np.testing.assert_allclose(mse_nrm(p, g, math.sqrt(16)), 2 * (1 - cosine(p, g)), atol=1e-12)
    assert mse_nrm(g, -g, 4.0) == pytest.approx([4.0] * 5)  # the range is [0, 4]
    assert mse_nrm(np.eye(2), np.eye(2)[::-1], math.sqrt(2)) == pytest.approx([2.0, 2.0])


def test_scale_none_means_raw_vectors():
    p, g = np.array([[3.0, 0.0]]), np.array([[1.0, 0.0]])
    assert mse_nrm(p, g, None) == pytest.approx([2.0])  # ((3-1)^2 + 0) / 2
    np.testing.assert_allclose(normalized(p, 5.0), [[5.0, 0.0]])


def test_predicting_the_mean_scores_zero_and_a_perfect_prediction_one():
    rng = np.random.default_rng(1)
    g = rng.standard_normal((64, 8)) + 2.0
    s = math.sqrt(8)
    perfect = float(mse_nrm(g, g, s).mean())
    assert fve(perfect, g, s) == pytest.approx(1.0)
    centre = normalized(g, s).mean(axis=0, keepdims=True)  # rawvar's centre (not renormalised)
    mean_mse = float(((normalized(g, s) - centre) ** 2).mean())
    assert fve(mean_mse, g, s, "rawvar") == pytest.approx(0.0, abs=1e-12)
    # meannorm's centre has norm s: a larger denominator, so the same mse scores higher
    assert baseline_variance(g, s, "meannorm") > baseline_variance(g, s, "rawvar")


def test_one_vector_has_no_variance_and_bad_baselines_are_refused():
    assert math.isnan(fve(0.1, np.ones((1, 4)), 2.0))
    with pytest.raises(ValueError, match="rawvar"):
        baseline_variance(np.ones((3, 4)), 2.0, "variance")
