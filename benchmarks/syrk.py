"""Gram accumulation: ``addmm_`` (a matrix product) against BLAS ``dsyrk`` (one triangle), one thread.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/syrk.py

The design matrices of VGG11's and ResNet-18's conv levels at 3x32x32 (rows of one batch of 25
samples x output positions, columns 9 x channels + 1): seconds of ``acc.addmm_(x.T, x)`` and of
:meth:`neurofuse.stats.AdditiveStats._add_gram` (which uses ``dsyrk`` from
:data:`neurofuse.stats.SYRK_MIN` columns), best of 3, and their ratio.
"""

from __future__ import annotations

import time

import torch

from neurofuse.stats import SYRK_MIN, AdditiveStats


class _Gram(AdditiveStats):
    fields = ("g",)


def best(f, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    torch.set_num_threads(1)
    print(f"SYRK_MIN = {SYRK_MIN}")
    print("| rows | columns | addmm_ s | _add_gram s | ratio |\n|---|---|---|---|---|")
    for rows, cols in [(25600, 28), (25600, 129), (25600, 577), (6400, 1153), (1600, 2305), (400, 4609)]:
        x = torch.randn(rows, cols, dtype=torch.float64)
        acc = torch.zeros(cols, cols, dtype=torch.float64)
        s = _Gram()
        s._add_gram("g", x)
        a = best(lambda: acc.addmm_(x.T, x))
        b = best(lambda: s._add_gram("g", x))
        print(f"| {rows} | {cols} | {a:.3f} | {b:.3f} | {a / b:.2f} |", flush=True)


if __name__ == "__main__":
    main()
