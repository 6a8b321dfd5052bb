"""The scaling-law fit against the law that generated the data, the frontier against hand arithmetic and a
brute-force search, and N against the parameters of a built model."""

import math

import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from lmforge.config import PRESETS
from lmforge.errors import ConfigError
from lmforge.model.info import count_params
from lmforge.plan.scaling import Fit, Law, compute_of_gpu_hours, fit_law, non_embedding_params, shape_near

# Hoffmann et al. 2022, approach 3 (their eq. 10): the generating law of the synthetic runs.
CHINCHILLA = Law(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
N_GRID = np.repeat([1e7, 2e7, 5e7, 1e8, 2e8], 4)
D_GRID = np.tile([2e8, 6e8, 2e9, 6e9], 5)


def synthetic(noise: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return CHINCHILLA.loss(N_GRID, D_GRID) * np.exp(rng.normal(0.0, noise, len(N_GRID)))


def test_the_fit_recovers_the_generating_law_from_exact_losses():
    fit = fit_law(N_GRID, D_GRID, CHINCHILLA.loss(N_GRID, D_GRID))
    for name in ("E", "A", "B", "alpha", "beta"):
        assert getattr(fit.law, name) == pytest.approx(getattr(CHINCHILLA, name), rel=2e-3), name
    assert np.max(np.abs(fit.residuals())) < 1e-6


def test_with_noise_the_bootstrap_intervals_cover_the_truth_and_the_extrapolation_holds():
    fit = fit_law(N_GRID, D_GRID, synthetic(0.002), bootstrap=40, seed=1)
    assert fit.law.alpha == pytest.approx(CHINCHILLA.alpha, abs=0.03)
    assert fit.law.beta == pytest.approx(CHINCHILLA.beta, abs=0.03)
    assert fit.law.E == pytest.approx(CHINCHILLA.E, rel=0.05)
    for name in ("E", "A", "B", "alpha", "beta"):
        lo, hi = fit.interval(name)
        assert lo <= getattr(CHINCHILLA, name) <= hi, (name, lo, hi)
    # 4x more parameters and tokens than any fitted run
    predicted, (lo, hi) = fit.predict(8e8, 2.4e10)
    truth = float(CHINCHILLA.loss(8e8, 2.4e10))
    assert predicted == pytest.approx(truth, rel=0.01)
    assert lo <= truth <= hi


def test_the_huber_loss_shrugs_off_an_outlier():
    losses = CHINCHILLA.loss(N_GRID, D_GRID)
    losses[5] *= 1.3  # one diverged run
    fit = fit_law(N_GRID, D_GRID, losses)
    assert fit.law.alpha == pytest.approx(CHINCHILLA.alpha, abs=0.01)
    assert fit.law.beta == pytest.approx(CHINCHILLA.beta, abs=0.01)


def test_the_frontier_matches_hand_arithmetic():
    # alpha = beta = 1/2, A = B = 1: G = (0.5 / 0.5)^1 = 1, so N_opt = D_opt = sqrt(C / 6); at C = 6e12 both
    # are 1e6 and the loss is E + 1/1000 + 1/1000.
    law = Law(E=2.0, A=1.0, B=1.0, alpha=0.5, beta=0.5)
    assert law.optimal_params(6e12) == pytest.approx(1e6, rel=1e-12)
    assert law.optimal_tokens(6e12) == pytest.approx(1e6, rel=1e-12)
    assert law.optimal_loss(6e12) == pytest.approx(2.002, rel=1e-12)
    # alpha = 1, beta = 1/2, A = 2, B = 1: G = (1 * 2 / (0.5 * 1))^(1/1.5) = 4^(2/3); N_opt = G (C/6)^(1/3)
    law = Law(E=1.0, A=2.0, B=1.0, alpha=1.0, beta=0.5)
    assert law.optimal_params(6e9) == pytest.approx(4 ** (2 / 3) * 1e3, rel=1e-12)
    assert law.optimal_tokens(6e9) == pytest.approx(1e6 / 4 ** (2 / 3), rel=1e-12)


@pytest.mark.parametrize("compute", [1e18, 5.76e23])
def test_the_frontier_is_the_minimum_of_the_loss_on_the_compute_curve(compute):
    def loss_on_curve(log_n):
        n = math.exp(log_n)
        return float(CHINCHILLA.loss(n, compute / (6 * n)))

    best = minimize_scalar(
        loss_on_curve, bounds=(math.log(1e3), math.log(1e15)), method="bounded", options={"xatol": 1e-10}
    )
    assert CHINCHILLA.optimal_params(compute) == pytest.approx(math.exp(best.x), rel=1e-4)
    assert CHINCHILLA.optimal_tokens(compute) == pytest.approx(compute / (6 * math.exp(best.x)), rel=1e-4)
    assert CHINCHILLA.optimal_loss(compute) == pytest.approx(best.fun, rel=1e-9)


def test_non_embedding_params_are_the_blocks_and_the_final_norm_of_a_built_model():
    import torch

    from lmforge.model.transformer import Transformer

    for cfg in (PRESETS["tiny"], PRESETS["gpt2-124m"]):
        with torch.device("meta"):
            model = Transformer(cfg)
        blocks = sum(
            p.numel() for name, p in model.named_parameters() if "emb" not in name and "head" not in name
        )
        assert non_embedding_params(cfg) == blocks
        assert non_embedding_params(cfg) < count_params(cfg)


def test_a_shape_near_a_parameter_count_keeps_the_family():
    base = PRESETS["7b"]
    for target in (1e8, 1.5e9, 6.5e9):
        shape = shape_near(base, target, aspect=base.d_model / base.n_layers)
        assert non_embedding_params(shape) == pytest.approx(target, rel=0.1)
        assert shape.head_dim == base.head_dim and shape.vocab_size == base.vocab_size


def test_gpu_hours_convert_at_peak_times_efficiency():
    # 1000 H100-hours at 989 TFLOP/s and 60%: 1000 x 3600 x 989e12 x 0.6
    assert compute_of_gpu_hours(1000, 989e12, 0.6) == pytest.approx(2.13624e21, rel=1e-9)


def test_too_few_or_degenerate_runs_are_refused_with_the_reason():
    with pytest.raises(ConfigError, match="at least 5 runs"):
        fit_law([1e6, 2e6], [1e9, 1e9], [3.0, 2.9])
    with pytest.raises(ConfigError, match="2 model sizes and 2 token budgets"):
        fit_law([1e6] * 6, [1e9, 2e9, 3e9, 4e9, 5e9, 6e9], [3, 2.9, 2.8, 2.7, 2.6, 2.5])
    with pytest.raises(ConfigError, match="finite and > 0"):
        fit_law([1e6, 2e6, 3e6, 4e6, 5e6], [1e9, 2e9, 1e9, 2e9, 1e9], [3, 2.9, float("nan"), 2.7, 2.6])


def test_a_law_without_a_frontier_gives_nan_not_a_complex_number():
    # a bootstrap refit on few distinct runs can come out with an exponent <= 0: no optimum on C = 6 N D
    law = Law(E=1.0, A=2.0, B=3.0, alpha=-0.1, beta=0.3)
    assert math.isnan(law.optimal_params(1e12)) and math.isnan(law.optimal_tokens(1e12))
    assert math.isnan(law.optimal_loss(1e12))


def test_the_fit_reports_the_mean_huber_loss_of_its_log_residuals():
    losses = synthetic(0.01, seed=3)
    fit = fit_law(N_GRID, D_GRID, losses)
    residual = np.log(fit.law.loss(N_GRID, D_GRID)) - np.log(losses)
    delta = 1e-3
    huber = np.where(np.abs(residual) <= delta, 0.5 * residual**2, delta * (np.abs(residual) - 0.5 * delta))
    assert fit.objective == pytest.approx(huber.mean() / delta, rel=1e-6)
    # the optimum: no start of the grid or nearby point does better
    for factor in (0.98, 1.02):
        for name in ("E", "A", "B", "alpha", "beta"):
            moved = Law(**{**fit.law.to_dict(), name: getattr(fit.law, name) * factor})
            r = np.log(moved.loss(N_GRID, D_GRID)) - np.log(losses)
            worse = np.where(np.abs(r) <= delta, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta)).mean() / delta
            assert worse >= fit.objective, (name, factor)


def test_intervals_are_the_central_percentiles_of_the_refits_and_residuals_are_relative_errors():
    laws = [Law(E=1.0 + k / 100, A=400.0, B=400.0, alpha=0.3 + k / 1000, beta=0.3) for k in range(101)]
    n, d = np.array([1e7, 1e8]), np.array([1e9, 1e10])
    truth = CHINCHILLA.loss(n, d)
    fit = Fit(law=CHINCHILLA, n=n, d=d, loss=truth * 1.25, objective=0.0, boot=laws, confidence=0.9)
    assert fit.interval("E") == pytest.approx((1.05, 1.95))  # the 5th and 95th of 1.00 .. 2.00
    assert fit.interval("alpha") == pytest.approx((0.305, 0.395))
    assert fit.residuals() == pytest.approx([1 / 1.25 - 1] * 2, rel=1e-12)  # fitted / measured - 1
    lo, hi = fit.predict(1e8, 1e10)[1]
    assert (lo, hi) == pytest.approx(tuple(np.percentile([law.loss(1e8, 1e10) for law in laws], [5, 95])))


def test_four_runs_are_too_few_and_a_zero_exponent_has_no_frontier():
    with pytest.raises(ConfigError, match="4 runs: the law has 5 parameters"):
        fit_law([1e6, 2e6, 1e6, 2e6], [1e9, 1e9, 2e9, 2e9], [3.0, 2.9, 2.8, 2.7])
    assert math.isnan(Law(E=1.0, A=2.0, B=3.0, alpha=0.0, beta=0.3).G)
    assert math.isnan(Law(E=1.0, A=2.0, B=3.0, alpha=0.3, beta=0.0).optimal_params(1e20))


def test_a_shape_near_a_count_keeps_the_grouped_query_heads():
    base = PRESETS["mistral-7b"]  # 32 query heads on 8 key-value heads: groups of 4
    for target in (2e8, 1.3e9):
        shape = shape_near(base, target, aspect=base.d_model / base.n_layers)
        assert shape.n_heads % 4 == 0 and shape.kv_heads * 4 == shape.n_heads, shape
        assert non_embedding_params(shape) == pytest.approx(target, rel=0.1)
