"""Multistep solvers in data prediction, as per-step linear forms (float64, on the host).

Each solver here is written over a time grid of ᾱ (sampling order: ᾱ_0 the noisiest visited
step, ᾱ_n = 1 after the last) and returns, for each step i, the coefficients of

    x_{i+1} = b·x_i + a·x̂0_i + d_1·x̂0_{i−1} + … + d_H·x̂0_{i−H}

as rows (b, a, d_1 … d_H) of `forms` (n, 2 + HISTORY): `samplers.py` puts them into its table.
With α = √ᾱ, σ = √(1−ᾱ), λ = log(α/σ), h_i = λ_{i+1} − λ_i (log-SNR step), and x̂0 the model's
(possibly clipped) data prediction at each visited point.

- DPM-Solver++(kM) (Lu et al. 2022, "DPM-Solver++", Alg. 2 and its third-order multistep), as
  diffusers' DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", lower_order_final=True,
  final_sigmas_type="zero"): order k once k points exist, first order at the last step and, on
  grids of fewer than 15 steps, at most second order at the one before.
- UniPC (Zhao et al. 2023, B(h) = h "bh1" or e^h − 1 "bh2"), as diffusers'
  UniPCMultistepScheduler(predict_x0=True, lower_order_final=True): the predictor UniP-p steps
  from the corrected x_i; the corrector UniC-p rewrites x_i once the model has seen x_i, reusing
  that model output, so NFE = steps. Both share their base (σ_{i}/σ_{i−1})·x^c_{i−1} −
  α_i(e^{−h}−1)·x̂0_{i−1}, so the corrected x^c_i = x_i + (UniC's − UniP's x̂0 terms): no earlier x
  needs to be kept, and the whole predictor-corrector step stays one form over x_i and x̂0's.

The last step goes to ᾱ = 1 (σ = 0, λ = ∞), where every solver's first-order step is x_0 = x̂0.
A grid with fewer steps than the order runs at the order its points allow (the warm-up above).

- iPNDM (Zhang & Chen 2023, "DEIS", its improved PNDM; as in zju-pi/diff-sampler): DDIM over
  an Adams–Bashforth combination of the newest ε's instead of ε (`adams_bashforth`), with fixed
  coefficients whatever the grid. It mixes ε's, not x̂0's: its tables keep an ε history.
"""
from __future__ import annotations

import math

import numpy as np

HISTORY = 3  # the last 3 steps: UniPC-3's corrector reads x̂0_{i−1} … x̂0_{i−3}, iPNDM ε_{i−1} … ε_{i−3}
UNIPC_VARIANTS = ("bh1", "bh2")
# Adams–Bashforth weights of ε_i, ε_{i−1}, … (newest first), by how many ε's exist (at most 4)
ADAMS_BASHFORTH = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12),
                   4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def _lambdas(ac: np.ndarray) -> np.ndarray:
    """λ = log(α/σ) = ½ (log ᾱ − log(1 − ᾱ)) at each visited step."""
    return 0.5 * (np.log(ac) - np.log1p(-ac))


class _Forms:
    """Linear forms over (x_i, x̂0_0 … x̂0_{n−1}) (absolute step indices), read out per step as
    (b, a, d_1 … d_H) relative to the step that uses them."""

    def __init__(self, n: int):
        self.n = n

    def x(self) -> np.ndarray:
        form = np.zeros(1 + self.n)
        form[0] = 1.0
        return form

    def x0(self, j: int) -> np.ndarray:
        form = np.zeros(1 + self.n)
        form[1 + j] = 1.0
        return form

    def row(self, form: np.ndarray, i: int) -> np.ndarray:
        """form of step i → (b, a, d_1 … d_H); x̂0 of steps after i or older than H is refused."""
        ages = np.nonzero(form[1:])[0]
        assert all(i - HISTORY <= j <= i for j in ages), f"step {i} reads x̂0 of steps {ages}"
        out = np.zeros(2 + HISTORY)
        out[0] = form[0]
        for age in range(HISTORY + 1):
            if i - age >= 0:
                out[1 + age] = form[1 + i - age]
        return out


def _alpha_sigma(ac: float) -> tuple[float, float]:
    return math.sqrt(ac), math.sqrt(1.0 - ac)


def dpmpp_multistep(ac_t: np.ndarray, ac_next: np.ndarray, order: int) -> np.ndarray:
    """DPM-Solver++(2M) or (3M): forms (n, 2 + HISTORY) for grid ᾱ_i = ac_t[i] → ac_next[i].

    With D0 = x̂0_i, r_k = h_{i−k}/h_i, D1_k = (x̂0_{i−k+1} − x̂0_{i−k})/r_k (k = 1, 2):
      1st order: x_{i+1} = (σ_{i+1}/σ_i) x_i − α_{i+1}(e^{−h}−1) D0
      2nd order: … − ½ α_{i+1}(e^{−h}−1) D1_1
      3rd order: … + α_{i+1}((e^{−h}−1)/h + 1) D1 − α_{i+1}((e^{−h}−1+h)/h² − ½) D2,
                 D1 = D1_1 + r_1/(r_1+r_2) (D1_1 − D1_2), D2 = (D1_1 − D1_2)/(r_1+r_2)."""
    assert order in (2, 3)
    n = len(ac_t)
    lam = _lambdas(ac_t)
    f = _Forms(n)
    rows = np.zeros((n, 2 + HISTORY))
    for i in range(n):
        if i == n - 1:  # to ᾱ = 1: σ_{i+1} = 0, e^{−h} = 0, so x_0 = x̂0 (first order)
            rows[i] = f.row(f.x0(i), i)
            continue
        step_order = min(order, i + 1)  # warm-up: the points seen so far
        if n < 15 and i == n - 2:  # diffusers' lower_order_final on short grids
            step_order = min(step_order, 2)
        alpha_next, sigma_next = _alpha_sigma(ac_next[i])
        sigma_i = math.sqrt(1.0 - ac_t[i])
        h = lam[i + 1] - lam[i]
        em1 = math.expm1(-h)  # e^{−h} − 1
        form = (sigma_next / sigma_i) * f.x() - alpha_next * em1 * f.x0(i)
        if step_order >= 2:
            r0 = (lam[i] - lam[i - 1]) / h
            d1_0 = (f.x0(i) - f.x0(i - 1)) / r0
        if step_order == 2:
            form = form - 0.5 * alpha_next * em1 * d1_0
        elif step_order == 3:
            r1 = (lam[i - 1] - lam[i - 2]) / h
            d1_1 = (f.x0(i - 1) - f.x0(i - 2)) / r1
            d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            form = (form + alpha_next * (em1 / h + 1.0) * d1
                    - alpha_next * ((em1 + h) / h**2 - 0.5) * d2)
        rows[i] = f.row(form, i)
    return rows


def _unipc_terms(lam: np.ndarray, ac: np.ndarray, f: _Forms, j: int, order: int, variant: str,
                 corrector: bool) -> np.ndarray:
    """The x̂0 terms of UniP-p (predictor) or UniC-p (corrector) over the interval j → j+1, whose
    shared base (σ_{j+1}/σ_j)·x − α_{j+1}(e^{−h}−1)·x̂0_j is left out. The corrector reads x̂0_{j+1}
    as well; x̂0_{j−1} … x̂0_{j−p+1} are the earlier points (r_k = (λ_{j−k} − λ_j)/h)."""
    h = lam[j + 1] - lam[j]
    hh = -h  # data prediction integrates in −λ
    alpha_next = math.sqrt(ac[j + 1])
    b_h = hh if variant == "bh1" else math.expm1(hh)
    rks = [(lam[j - k] - lam[j]) / h for k in range(1, order)] + [1.0]
    d1s = [(f.x0(j - k) - f.x0(j)) / rks[k - 1] for k in range(1, order)]
    # R[p−1, k] = r_k^{p−1};  b_p = p! φ_{p+1}(hh) hh^{−p}·hh / B(h) (the recursion on h_phi_k)
    h_phi_k, factorial = math.expm1(hh) / hh - 1.0, 1
    big_r, rhs = [], []
    for p in range(1, order + 1):
        big_r.append([rk ** (p - 1) for rk in rks])
        rhs.append(h_phi_k * factorial / b_h)
        factorial *= p + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    big_r, rhs = np.array(big_r), np.array(rhs)
    if corrector:
        rhos = np.array([0.5]) if order == 1 else np.linalg.solve(big_r, rhs)
        d1s = d1s + [f.x0(j + 1) - f.x0(j)]
    elif order == 1:
        return np.zeros(1 + f.n)
    else:
        rhos = np.array([0.5]) if order == 2 else np.linalg.solve(big_r[:-1, :-1], rhs[:-1])
    return -alpha_next * b_h * sum(rho * d for rho, d in zip(rhos, d1s, strict=True))


def unipc(ac_t: np.ndarray, ac_next: np.ndarray, order: int, variant: str) -> np.ndarray:
    """UniPC-p with B(h) `variant`: forms (n, 2 + HISTORY) for grid ᾱ_i = ac_t[i] → ac_next[i].

    Step i: x^c_i = x_i + UniC_{p_{i−1}}(i−1 → i) − UniP_{p_{i−1}}(i−1 → i)  (i > 0), then
    x_{i+1} = (σ_{i+1}/σ_i) x^c_i − α_{i+1}(e^{−h}−1) x̂0_i + UniP_{p_i}(i → i+1), with
    p_i = min(order, n − i, i + 1) (diffusers' lower_order_final and warm-up)."""
    assert order in (1, 2, 3) and variant in UNIPC_VARIANTS
    n = len(ac_t)
    ac = np.append(ac_t, ac_next[-1])
    lam = _lambdas(ac_t)
    f = _Forms(n)
    rows = np.zeros((n, 2 + HISTORY))
    orders = [min(order, n - i, i + 1) for i in range(n)]
    for i in range(n):
        if i == n - 1:  # to ᾱ = 1: x_0 = x̂0 (UniP-1 with σ_{i+1} = 0 reads no x, corrected or not)
            rows[i] = f.row(f.x0(i), i)
            continue
        x_c = f.x()
        if i > 0:
            p = orders[i - 1]
            x_c = (x_c + _unipc_terms(lam, ac, f, i - 1, p, variant, corrector=True)
                   - _unipc_terms(lam, ac, f, i - 1, p, variant, corrector=False))
        alpha_next, sigma_next = _alpha_sigma(ac[i + 1])
        h = lam[i + 1] - lam[i]
        form = ((sigma_next / math.sqrt(1.0 - ac[i])) * x_c - alpha_next * math.expm1(-h) * f.x0(i)
                + _unipc_terms(lam, ac, f, i, orders[i], variant, corrector=False))
        rows[i] = f.row(form, i)
    return rows


def adams_bashforth(n: int, order: int) -> np.ndarray:
    """(n, 1 + HISTORY): the weights of ε_i, ε_{i−1} … ε_{i−HISTORY} at each of n steps, of
    order min(order, i + 1) (warm-up: the ε's seen so far; no lower-order final step)."""
    assert order in ADAMS_BASHFORTH
    weights = np.zeros((n, 1 + HISTORY))
    for i in range(n):
        used = ADAMS_BASHFORTH[min(order, i + 1)]
        weights[i, :len(used)] = used
    return weights
