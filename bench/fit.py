"""The critical-batch fit: steps-to-target against global batch, one estimator, with an interval
that reflects the spread between seeds.

Owns: the model steps(B) = S_min (1 + B_crit / B) (McCandlish et al. 2018; Shallue et al. 2018),
the estimator (``fit_steps_curve``), its bootstrap interval, which measured points a sweep's fit
uses (``fit_sweep``), and the comparison of B_crit with the in-run gradient noise scale
(``critical_batch``). docs/results.md explains each choice.

The estimator, chosen on purpose:
- **one point per batch size**: the mean steps-to-target over that batch's runs. Every batch
  counts once, however many seeds it has (a per-run fit lets the batches with more seeds pull
  the curve: on results/shapes-gpu, 2 seeds at 128..512 and 1 above, per-run points and
  per-batch means gave B_crit 1,128 vs 1,428 with the old weighted fit);
- **least squares on log(steps)**: seed noise on steps-to-target is roughly proportional to the
  steps, so the residual that matters is relative; log residuals are scale-free and need no
  weights computed from the data (weighting by 1/steps or not moved B_crit on MLPerf's ResNet-50
  reference points from ~40k to ~48k). For a given B_crit the best log S_min is closed-form, so
  the fit is a one-dimensional search over log B_crit;
- **interval**: percentile bootstrap over runs *within* each batch size (stratified: every
  resample keeps each batch's seed count), ``BOOTSTRAP_RESAMPLES`` resamples from a fixed RNG
  seed, so a report is reproducible. A batch with one run adds no spread; with one run per batch
  there is no interval. With n seeds the bootstrap understates the spread of a mean by
  sqrt((n-1)/n) (0.71 at n = 2): read the interval as a lower bound on the uncertainty;
- **coarse points excluded** (``fit_sweep``): a batch size whose crossings are resolved more
  coarsely than ``MAX_RESOLUTION_FRACTION`` of its mean steps-to-target (on average the evaluation
  before the crossing lies more than 25 % earlier) is left out and named, per batch rather than
  per run (dropping single runs would keep the seeds that crossed late), and rather than modelled
  as interval-censored: a
  censored likelihood would need a noise model that one or two seeds cannot pin down, and the
  crossing evaluation overstates the true crossing by up to its resolution, i.e. by more than
  the seed spread we are trying to measure. Evaluating at ``eval_every_steps: auto`` keeps every
  crossing after step 8 within 16 %, so nothing is lost there.

Must not import: torch, ray, matplotlib. numpy/scipy here; pandas only in ``fit_sweep``'s input.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0  # fixed: the same results give the same interval in every report
CONFIDENCE = 0.95
MAX_RESOLUTION_FRACTION = 0.25
NOISE_AGREEMENT = 3.0  # McCandlish et al. 2018 found B_simple within about this factor of B_crit
_SEARCH_DECADES = 3.0  # B_crit is searched from min(B) / 10^3 to max(B) * 10^3
_GRID = 600


def _grid(batches: np.ndarray) -> np.ndarray:
    lo = math.log(batches.min()) - _SEARCH_DECADES * math.log(10)
    hi = math.log(batches.max()) + _SEARCH_DECADES * math.log(10)
    return np.linspace(lo, hi, _GRID)


def _sse(y: np.ndarray, batches: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Sum of squared log residuals, best log S_min profiled out: rows of y (R x nb) against
    log B_crit values u (G) -> R x G."""
    shape = np.log1p(np.exp(u)[:, None] / batches[None, :])  # G x nb
    nb = batches.size
    sy, sl = y.sum(axis=1), shape.sum(axis=1)
    return ((y**2).sum(axis=1)[:, None] - 2 * y @ shape.T + (shape**2).sum(axis=1)[None, :]
            - (sy[:, None] - sl[None, :]) ** 2 / nb)


def _solve(y: np.ndarray, batches: np.ndarray, *, polish: bool) -> tuple[np.ndarray, np.ndarray]:
    """(B_crit, S_min) per row of y; B_crit is 0 or inf where the best value is at the search
    bound (no plateau / no perfect-scaling region in reach), S_min NaN then."""
    u = _grid(batches)
    sse = _sse(y, batches, u)
    best = sse.argmin(axis=1)
    rows = np.arange(y.shape[0])
    inner = (best > 0) & (best < u.size - 1)
    # parabola through the best grid point and its neighbours (grid step ~3 %)
    i = np.clip(best, 1, u.size - 2)
    a, b, c = sse[rows, i - 1], sse[rows, i], sse[rows, i + 1]
    denom = a - 2 * b + c
    shift = np.where(denom > 0, 0.5 * (a - c) / np.where(denom > 0, denom, 1.0), 0.0)
    u_best = u[i] + np.clip(shift, -1, 1) * (u[1] - u[0])
    if polish:
        from scipy.optimize import minimize_scalar

        for r in np.flatnonzero(inner):
            res = minimize_scalar(lambda x, r=r: float(_sse(y[r:r + 1], batches, np.array([x]))[0, 0]),
                                  bounds=(u[i[r] - 1], u[i[r] + 1]), method="bounded",
                                  options={"xatol": 1e-12})
            u_best[r] = res.x
    b_crit = np.where(inner, np.exp(u_best), np.where(best == 0, 0.0, np.inf))
    log_s_min = (y - np.log1p(np.where(inner, b_crit, 1.0)[:, None] / batches[None, :])).mean(axis=1)
    return b_crit, np.where(inner, np.exp(log_s_min), np.nan)


def _empty(n_points: int, n_batches: int, reason: str) -> dict[str, Any]:
    nan = math.nan
    return {"S_min": nan, "B_crit": nan, "S_min_err": nan, "B_crit_err": nan, "S_min_lo": nan, "S_min_hi": nan,
            "B_crit_lo": nan, "B_crit_hi": nan, "n_points": n_points, "n_batches": n_batches,
            "n_batches_with_spread": 0, "rel_rms": nan, "reason": reason, "interval_reason": reason,
            "confidence": CONFIDENCE, "resamples": 0, "excluded": [], "batch_min": nan, "batch_max": nan}


def fit_steps_curve(batch: Iterable[float], steps: Iterable[float], *, resamples: int = BOOTSTRAP_RESAMPLES,
                    seed: int = BOOTSTRAP_SEED, confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Fit steps(B) = S_min (1 + B_crit / B) to per-run points (see the module docstring).

    Returns S_min, B_crit (point estimates from the per-batch means), batch_min/batch_max (the
    batch range the fit saw: B_crit beyond it is an extrapolation), their bootstrap std
    (``*_err``) and ``confidence`` percentile interval (``*_lo``/``*_hi``; B_crit_hi may be inf
    when some resamples have no plateau), n_points, n_batches, n_batches_with_spread (batches
    with two or more runs), rel_rms (relative residual of the means), ``reason`` (why there is
    no fit, else None) and ``interval_reason`` (why there is no interval, else None).
    """
    b = np.asarray(list(batch), dtype=float)
    s = np.asarray(list(steps), dtype=float)
    ok = np.isfinite(b) & np.isfinite(s) & (b > 0) & (s > 0)
    b, s = b[ok], s[ok]
    batches = np.unique(b)
    groups = [np.log(s[b == x]) for x in batches]  # log of each run's steps, per batch
    if batches.size < 2:
        return _empty(int(b.size), int(batches.size), "fewer than two batch sizes reached the target")
    means = np.array([[np.exp(g).mean() for g in groups]])
    b_crit, s_min = _solve(np.log(means), batches, polish=True)
    out = _empty(int(b.size), int(batches.size), "")
    out.update(reason=None, interval_reason=None, n_batches_with_spread=sum(g.size > 1 for g in groups),
               batch_min=float(batches.min()), batch_max=float(batches.max()))
    if not math.isfinite(s_min[0]):
        where = (f"steps fall as 1/B throughout, B_crit above batch {batches.max():g}" if b_crit[0] > 0
                 else f"steps do not fall with the batch size as modelled, B_crit below batch {batches.min():g}")
        out["reason"] = f"fit has no plateau in the measured range ({where})"
        out["interval_reason"] = out["reason"]
        return out
    pred = s_min[0] * (1 + b_crit[0] / batches)
    out.update(S_min=float(s_min[0]), B_crit=float(b_crit[0]),
               rel_rms=float(np.sqrt(np.mean(((means[0] - pred) / means[0]) ** 2))))
    if out["n_batches_with_spread"] == 0:
        out["interval_reason"] = "one run per batch size: the spread between seeds is unknown"
        return out
    out.update(_bootstrap(groups, batches, resamples, seed, confidence))
    return out


def _bootstrap(groups: list[np.ndarray], batches: np.ndarray, resamples: int, seed: int,
               confidence: float) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    means = np.empty((resamples, batches.size))
    for j, g in enumerate(groups):
        values = np.exp(g)
        means[:, j] = values[rng.integers(0, g.size, size=(resamples, g.size))].mean(axis=1)
    b_crit, s_min = _solve(np.log(means), batches, polish=False)
    tail = (1 - confidence) / 2
    out: dict[str, Any] = {"resamples": resamples}
    for name, values in (("B_crit", b_crit), ("S_min", s_min)):
        filled = np.where(np.isnan(values), np.inf, values) if name == "S_min" else values
        lo, hi = np.quantile(filled, [tail, 1 - tail], method="inverted_cdf")
        out[f"{name}_lo"], out[f"{name}_hi"] = float(lo), float(hi)
        finite = values[np.isfinite(values)]
        out[f"{name}_err"] = float(finite.std(ddof=1)) if finite.size == values.size else math.nan
    if out["B_crit_lo"] == out["B_crit_hi"]:
        out["interval_reason"] = ("the runs within each batch size agree exactly, so resampling them shows no "
                                  "spread: the interval has zero width and says nothing")
    elif not math.isfinite(out["B_crit_hi"]) or out["B_crit_lo"] == 0:
        out["interval_reason"] = (f"{np.mean(~np.isfinite(s_min)):.0%} of the resamples have no plateau "
                                  "in the measured range: the interval is open")
    return out


def fit_sweep(runs: Any, *, max_resolution_fraction: float = MAX_RESOLUTION_FRACTION,
              **kw: Any) -> dict[str, Any]:
    """The fit of one sweep's runs_frame rows: runs that reached the target (first crossing),
    damaged runs left out, and every batch whose crossings are resolved more coarsely than
    ``max_resolution_fraction`` of its mean steps-to-target (mean resolution / mean steps)
    excluded, named in ``excluded`` (sentences) and listed in ``excluded_batches``. The rule is applied per batch, not per run: at one
    evaluation spacing a seed that crossed later has the smaller relative interval, so dropping
    single runs would keep the slow seeds and bias the batch's mean upwards."""
    usable = runs[runs["status"].ne("damaged") & runs["steps_to_target"].notna()]
    excluded: list[str] = []
    coarse: list[float] = []
    if "steps_to_target_resolution" in usable:
        for batch, g in usable.groupby("global_batch_size"):
            steps, width = g["steps_to_target"].mean(), g["steps_to_target_resolution"].mean()
            if width > max_resolution_fraction * steps:
                coarse.append(batch)
                excluded.append(f"batch {batch:g}: mean crossing at step {steps:.4g}, resolved to {width:.4g} steps "
                                f"({width / steps:.0%}; {len(g)} run{'s' * (len(g) != 1)})")
        usable = usable[~usable["global_batch_size"].isin(coarse)]
    fit = fit_steps_curve(usable["global_batch_size"], usable["steps_to_target"], **kw)
    fit["excluded"] = excluded
    fit["excluded_batches"] = [float(b) for b in coarse]
    if excluded and fit["reason"]:
        fit["reason"] += f" (after excluding {len(excluded)} coarsely resolved batch size(s))"
    return fit


def caveats(fit: dict[str, Any]) -> list[str]:
    """What a reader must know before using a fit's B_crit (empty when nothing)."""
    out = []
    b_crit = fit.get("B_crit", math.nan)
    if not math.isfinite(b_crit):
        return out
    if fit.get("n_batches") == 2:
        out.append("two batch sizes: the curve passes through both points, so nothing tests the model")
    if b_crit > fit.get("batch_max", math.inf):
        out.append(f"B_crit lies beyond the largest batch in the fit ({fit['batch_max']:g}): an extrapolation")
    elif b_crit < fit.get("batch_min", 0.0):
        out.append(f"B_crit lies below the smallest batch in the fit ({fit['batch_min']:g}): an extrapolation")
    return out


def _b_simple_by_batch(sweep_runs: Any) -> dict[float, list[float]]:
    """Each global batch's runs' B_simple (finite values only), for the report to show their range."""
    if not len(sweep_runs) or "global_batch_size" not in sweep_runs:
        return {}
    known = sweep_runs.dropna(subset=["noise_scale_b_simple"])
    return {float(b): [float(x) for x in g] for b, g in known.groupby("global_batch_size")["noise_scale_b_simple"]}


def critical_batch(sweep_runs: Any, fit: dict[str, Any]) -> dict[str, Any]:
    """One sweep's two estimates of the critical batch: B_crit from the steps(B) fit and the in-run
    B_simple (median over runs of each run's late-training median), their ratio, whether they
    agree within NOISE_AGREEMENT, and otherwise why not (a sentence for the report); and each
    batch's B_simple values (``B_simple_by_batch``), since the pooled median depends on which
    batches were run."""
    b_crit = float(fit.get("B_crit", math.nan))
    b_simple = float(sweep_runs["noise_scale_b_simple"].median()) if len(sweep_runs) else math.nan
    out = {"B_crit": b_crit, "B_simple": b_simple, "ratio": math.nan, "agree": None, "why_not": None,
           "B_simple_by_batch": _b_simple_by_batch(sweep_runs)}
    if not math.isfinite(b_simple):
        out["why_not"] = ("no run measured the gradient noise scale (set noise_scale_every_steps; one worker "
                          "also needs gradient accumulation, so that there are two batch sizes to compare)")
    elif not math.isfinite(b_crit):
        out["why_not"] = f"B_crit could not be fitted: {fit.get('reason') or 'no fit'}"
    else:
        out["ratio"] = b_simple / b_crit
        out["agree"] = 1 / NOISE_AGREEMENT <= out["ratio"] <= NOISE_AGREEMENT
        if not out["agree"]:
            out["why_not"] = (f"they differ by {max(out['ratio'], 1 / out['ratio']):.1f}x: B_simple is the noise "
                              "scale late in training under a simplifying isotropic-Hessian assumption, while B_crit "
                              "summarises the whole run to the target, whose accuracy also sets it")
    return out
