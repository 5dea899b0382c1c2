#!/usr/bin/env python
"""Fit the polynomial of the fp32 exp used by the silu_mul CPU kernels (csrc/cpu/kernels/exp_poly.h).

exp(x) = 2^n * e^r with n = round(x / ln 2) and r = x - n ln 2 in [-ln2/2, ln2/2]; e^r is a
degree-6 polynomial P(r), the minimax approximation of the *relative* error |P(r) / e^r - 1|
(Remez exchange in float64). Prints the fp32-rounded coefficients and the fit's relative error
(~1e-10 before rounding them, far below fp32's 6e-8 ulp: the kernel's error is its own fp32
rounding, which tests/test_rope_swiglu.py measures against float64).

    python scripts/fit_exp_poly.py
"""
import numpy as np

DEG = 6
LO, HI = -np.log(2) / 2, np.log(2) / 2


def remez(iters=40):
    n = DEG + 2  # unknowns: DEG + 1 coefficients and the levelled error E
    k = np.arange(n)
    ref = (LO + HI) / 2 + (HI - LO) / 2 * -np.cos(np.pi * k / (n - 1))  # Chebyshev extrema
    grid = np.linspace(LO, HI, 400001)
    for _ in range(iters):
        # P(r_i) - e^{r_i} = (-1)^i E e^{r_i}: the relative error levels at +-E
        A = np.zeros((n, n))
        A[:, :DEG + 1] = ref[:, None] ** np.arange(DEG + 1)[None]
        A[:, DEG + 1] = -((-1.0) ** k) * np.exp(ref)
        c = np.linalg.solve(A, np.exp(ref))[:DEG + 1]
        err = np.polynomial.polynomial.polyval(grid, c) / np.exp(grid) - 1
        sign = np.sign(err)
        runs = np.split(np.arange(grid.size), np.nonzero(np.diff(sign))[0] + 1)
        ext = [run[np.argmax(np.abs(err[run]))] for run in runs]
        while len(ext) > n:  # drop the smaller end extremum until n alternating points remain
            ext = ext[1:] if abs(err[ext[0]]) < abs(err[ext[-1]]) else ext[:-1]
        if len(ext) < n:
            break
        ref = grid[ext]
    return c, np.abs(err).max()


if __name__ == "__main__":
    c, e = remez()
    c32 = c.astype(np.float32)
    r = np.linspace(LO, HI, 400001)
    rel = np.abs(np.polynomial.polynomial.polyval(r, c32.astype(np.float64)) / np.exp(r) - 1).max()
    print(f"minimax relative error {e:.3e}; with fp32-rounded coefficients {rel:.3e}")
    for j, v in enumerate(c32):
        print(f"  c{j} = {float(v)!r:>24}f  // bits {int(v.view(np.uint32)):#010x}")
