"""Scaling laws: fit L(N, D) = E + A / N^alpha + B / D^beta to measured runs and read the compute-optimal
frontier off the fit.

The fit is Hoffmann et al. 2022 ("Chinchilla"), approach 3: with a = log A, b = log B, e = log E, minimise
the Huber loss (delta 1e-3) of the log-space residuals LSE(a - alpha log N, b - beta log D, e) - log L with
quasi-Newton steps from a grid of starting points, keeping the best. (The paper used L-BFGS; with five
parameters there is no memory to limit, so this uses scipy's dense BFGS, which reaches the same optimum
~20x faster here than scipy 1.17's L-BFGS-B.) Intervals come from a bootstrap over the runs
(resample with replacement, refit), reported as percentiles.

N is the *non-embedding* parameter count (``non_embedding_params``: the blocks and the final norm; no token
or position embedding and no output head), as in Kaplan et al. 2020; D is the tokens trained on. Compute is
C = 6 N D in the same N. ``lmforge plan`` counts every parameter; ``Recommendation`` gives both.

Pure: numpy and scipy (imported lazily: the ``scale`` extra), no torch.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field

import numpy as np

from lmforge.config import ModelConfig
from lmforge.errors import ConfigError
from lmforge.model.info import count_params

HUBER_DELTA = 1e-3  # Hoffmann et al. 2022, appendix D.2
# The starting points of the optimiser (a coarser version of the paper's grid: it used steps of 0.5 and 5).
INIT_GRID = {
    "a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "e": (-1.0, -0.5, 0.0, 0.5, 1.0),
    "alpha": (0.1, 0.3, 0.5, 1.0, 1.5),
    "beta": (0.1, 0.3, 0.5, 1.0, 1.5),
}
PARAM_NAMES = ("E", "A", "B", "alpha", "beta")


def non_embedding_params(cfg: ModelConfig) -> int:
    """N of the law: every parameter but the token (and learned position) embedding and the output head."""
    lookup = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    if cfg.position == "learned":
        lookup += cfg.max_seq_len * cfg.d_model
    return count_params(cfg) - lookup


# -- the law --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Law:
    """L(N, D) = E + A / N^alpha + B / D^beta."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, n, d):
        return self.E + self.A / np.power(n, self.alpha) + self.B / np.power(d, self.beta)

    @property
    def G(self) -> float:
        """NaN where the law has no compute-optimal frontier (an exponent <= 0, as a bootstrap refit on a
        few distinct runs can give)."""
        if self.alpha <= 0 or self.beta <= 0:
            return math.nan
        return (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))

    def optimal_params(self, compute):
        """N_opt(C) = G (C/6)^(beta/(alpha+beta)): the minimiser of L on the curve C = 6 N D."""
        return self.G * np.power(np.asarray(compute, dtype=float) / 6.0, self.beta / (self.alpha + self.beta))

    def optimal_tokens(self, compute):
        """D_opt(C) = (C/6)^(alpha/(alpha+beta)) / G."""
        return (
            np.power(np.asarray(compute, dtype=float) / 6.0, self.alpha / (self.alpha + self.beta)) / self.G
        )

    def optimal_loss(self, compute):
        return self.loss(self.optimal_params(compute), self.optimal_tokens(compute))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def as_array(self) -> np.ndarray:
        return np.array([self.E, self.A, self.B, self.alpha, self.beta])


# -- the fit --------------------------------------------------------------------------------------------------


def _objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, delta: float):
    """Mean Huber loss of the log-space residuals (divided by delta) and its gradient; theta = (a, b, e,
    alpha, beta)."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])  # (3, runs)
    top = terms.max(axis=0)
    weights = np.exp(terms - top)
    total = weights.sum(axis=0)
    residual = top + np.log(total) - log_l
    weights /= total  # softmax: d LSE / d term
    small = np.abs(residual) <= delta
    huber = np.where(small, 0.5 * residual**2, delta * (np.abs(residual) - 0.5 * delta))
    slope = np.clip(residual, -delta, delta)  # d huber / d residual
    grad = np.array(
        [
            np.sum(slope * weights[0]),
            np.sum(slope * weights[1]),
            np.sum(slope * weights[2]),
            -np.sum(slope * weights[0] * log_n),
            -np.sum(slope * weights[1] * log_d),
        ]
    )
    scale = 1.0 / (delta * len(log_l))
    return huber.sum() * scale, grad * scale


def _law_of(theta: np.ndarray) -> Law:
    a, b, e, alpha, beta = theta
    return Law(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=float(alpha), beta=float(beta))


def _minimise(log_n, log_d, log_l, starts: list[np.ndarray], delta: float) -> tuple[np.ndarray, float]:
    try:
        from scipy.optimize import minimize
    except ImportError:
        raise ConfigError("fitting a scaling law needs scipy: pip install 'lmforge[scale]'") from None

    best, best_value = None, math.inf
    for start in starts:
        res = minimize(
            _objective,
            start,
            args=(log_n, log_d, log_l, delta),
            jac=True,
            method="BFGS",
            options={"maxiter": 2000, "gtol": 1e-8},
        )
        if np.all(np.isfinite(res.x)) and res.fun < best_value:
            best, best_value = res.x, float(res.fun)
    return best, best_value


def _grid_starts(log_n, log_d, log_l, delta: float, keep: int) -> list[np.ndarray]:
    """The ``keep`` grid points with the lowest objective (all of them are scored at once; the optimiser starts
    from the best, which saves the time of running it from every point of the grid)."""
    grid = np.array(list(itertools.product(*(INIT_GRID[k] for k in ("a", "b", "e", "alpha", "beta")))))
    a, b, e, alpha, beta = (grid[:, i : i + 1] for i in range(5))  # (points, 1) against (runs,)
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.broadcast_to(e, (len(grid), len(log_n)))])
    residual = np.logaddexp.reduce(terms, axis=0) - log_l  # (points, runs)
    small = np.abs(residual) <= delta
    values = np.where(small, 0.5 * residual**2, delta * (np.abs(residual) - 0.5 * delta)).sum(axis=1)
    return [grid[i] for i in np.argsort(values, kind="stable")[:keep]]


@dataclass
class Fit:
    """The fitted law, the runs it was fitted to, and the bootstrap's refits (for intervals)."""

    law: Law
    n: np.ndarray
    d: np.ndarray
    loss: np.ndarray
    objective: float
    boot: list[Law] = field(default_factory=list)
    confidence: float = 0.95

    def _percentiles(self, values: np.ndarray) -> tuple[float, float]:
        tail = 100 * (1 - self.confidence) / 2
        lo, hi = np.nanpercentile(values, [tail, 100 - tail])
        return float(lo), float(hi)

    def interval(self, name: str) -> tuple[float, float] | None:
        """The bootstrap interval of one parameter (E, A, B, alpha, beta)."""
        if not self.boot:
            return None
        return self._percentiles(np.array([getattr(law, name) for law in self.boot]))

    def predict(self, n: float, d: float) -> tuple[float, tuple[float, float] | None]:
        """L(n, d) and its bootstrap interval."""
        value = float(self.law.loss(n, d))
        if not self.boot:
            return value, None
        return value, self._percentiles(np.array([float(law.loss(n, d)) for law in self.boot]))

    def frontier(self, compute: float) -> dict:
        """N_opt, D_opt and the loss there at compute C, each with its bootstrap interval."""
        out = {
            "compute": compute,
            "params": float(self.law.optimal_params(compute)),
            "tokens": float(self.law.optimal_tokens(compute)),
            "loss": float(self.law.optimal_loss(compute)),
        }
        for key, of in (("params", "optimal_params"), ("tokens", "optimal_tokens"), ("loss", "optimal_loss")):
            if self.boot:
                values = np.array([float(getattr(law, of)(compute)) for law in self.boot])
                out[f"{key}_interval"] = self._percentiles(values)
        return out

    def residuals(self) -> np.ndarray:
        """Relative errors of the fitted law on the runs it was fitted to."""
        return self.law.loss(self.n, self.d) / self.loss - 1.0

    def to_dict(self) -> dict:
        params = {}
        for name in PARAM_NAMES:
            params[name] = {"value": getattr(self.law, name), "interval": self.interval(name)}
        return {
            "law": "L(N, D) = E + A / N^alpha + B / D^beta",
            "N": "non-embedding parameters",
            "D": "tokens trained on",
            "params": params,
            "huber_delta": HUBER_DELTA,
            "objective": self.objective,
            "bootstrap": len(self.boot),
            "confidence": self.confidence,
            "runs": [
                {"N": int(n), "D": int(d), "loss": float(loss), "fitted": float(self.law.loss(n, d))}
                for n, d, loss in zip(self.n, self.d, self.loss)
            ],
            "max_abs_residual": float(np.max(np.abs(self.residuals()))),
        }


def check_points(n, d, loss) -> None:
    """Enough runs, spread over N and D, with finite positive values; else a ConfigError naming the gap."""
    n, d, loss = (np.asarray(x, dtype=float) for x in (n, d, loss))
    problems = []
    if not (len(n) == len(d) == len(loss)):
        problems.append(f"N, D and loss have different lengths ({len(n)}, {len(d)}, {len(loss)})")
    elif len(loss) < 5:
        problems.append(f"{len(loss)} runs: the law has 5 parameters, fit at least 5 runs (better 12+)")
    for name, values in (("N", n), ("D", d), ("loss", loss)):
        if not np.all(np.isfinite(values)) or np.any(values <= 0):
            problems.append(f"every {name} must be finite and > 0 (got {values.tolist()})")
    if len(set(n.tolist())) < 2 or len(set(d.tolist())) < 2:
        problems.append(
            f"the runs need at least 2 model sizes and 2 token budgets (got {len(set(n.tolist()))} sizes, "
            f"{len(set(d.tolist()))} budgets)"
        )
    if problems:
        raise ConfigError("cannot fit a scaling law:\n  " + "\n  ".join(problems))


def fit_law(
    n,
    d,
    loss,
    *,
    bootstrap: int = 0,
    seed: int = 0,
    delta: float = HUBER_DELTA,
    starts: int = 30,
    confidence: float = 0.95,
) -> Fit:
    """Fit L(N, D) to runs (arrays of non-embedding parameters, tokens, final validation losses).

    ``bootstrap`` refits on that many resamples of the runs (with replacement, seeded) for intervals; each
    refit starts from the full fit's optimum and the best few grid points of its own resample."""
    check_points(n, d, loss)
    n, d, loss = (np.asarray(x, dtype=float) for x in (n, d, loss))
    log_n, log_d, log_l = np.log(n), np.log(d), np.log(loss)
    best, value = _minimise(log_n, log_d, log_l, _grid_starts(log_n, log_d, log_l, delta, starts), delta)
    boot = []
    rng = np.random.default_rng(seed)
    for _ in range(bootstrap):
        pick = rng.integers(0, len(loss), len(loss))
        if len(set(n[pick].tolist())) < 2 or len(set(d[pick].tolist())) < 2:
            pick = rng.integers(0, len(loss), len(loss))  # a degenerate resample: draw once more
        sample = (log_n[pick], log_d[pick], log_l[pick])
        theta, _ = _minimise(*sample, [best, *_grid_starts(*sample, delta, 1)], delta)
        boot.append(_law_of(theta))
    return Fit(law=_law_of(best), n=n, d=d, loss=loss, objective=value, boot=boot, confidence=confidence)


# -- from a budget to a model shape ---------------------------------------------------------------------------


def compute_of_gpu_hours(gpu_hours: float, peak_flops: float, efficiency: float) -> float:
    """Training FLOPs a GPU-hour budget buys at the planner's assumption: peak x compute_efficiency."""
    return gpu_hours * 3600.0 * peak_flops * efficiency


def shape_near(base: ModelConfig, target_params: float, aspect: float, tolerance: float = 0.1) -> ModelConfig:
    """A shape of ``base``'s family (its head size, FFN ratio, vocabulary, switches) whose non-embedding
    parameter count is near ``target_params``: among widths in steps of the head size and depths 1-160
    within ``tolerance`` of the target, the one whose d_model / n_layers is closest to ``aspect``; the
    closest count when none is within it."""
    head = base.head_dim
    ffn_ratio = None if base.ffn_hidden is None else base.ffn_hidden / base.d_model
    group = base.n_heads // base.kv_heads
    best, best_key = None, None
    for layers in range(1, 161):
        # per block ~ 12 d^2: look at widths around the one that gives the target at this depth
        guess = math.sqrt(max(target_params, 1.0) / (12.0 * layers))
        for heads in range(max(1, round(guess / head) - 3), round(guess / head) + 4):
            if heads % group:
                continue
            d = heads * head
            cfg = dataclasses.replace(
                base,
                d_model=d,
                n_layers=layers,
                n_heads=heads,
                n_kv_heads=heads // group if base.n_kv_heads is not None else None,
                head_size=base.head_size,
                ffn_hidden=None if ffn_ratio is None else max(1, round(ffn_ratio * d)),
            )
            miss = abs(math.log(non_embedding_params(cfg) / target_params))
            key = (miss > math.log1p(tolerance), miss if miss > math.log1p(tolerance) else 0.0)
            key = (*key, abs(math.log((d / layers) / aspect)))
            if best_key is None or key < best_key:
                best, best_key = cfg, key
    if best is None:
        raise ConfigError(f"no model shape near {target_params:.3g} non-embedding parameters")
    return best
