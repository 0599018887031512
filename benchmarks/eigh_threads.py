"""Why the closed form runs its eigendecomposition on one thread: time ``torch.linalg.eigh`` of a
Gram matrix on 1 thread and on all threads, side by side, idle and with a competing process.

    python benchmarks/eigh_threads.py [--dims 785 2305] [--load]
    python benchmarks/eigh_threads.py --backends --dims 2305 4609     # torch vs scipy, 1 thread

``--load`` starts one busy process on another core for the duration (as a second job would),
which is when multi-threaded eigh degrades most.  Prints seconds and the ratio threads/1-thread.
``--backends`` compares, on one thread and in CPU seconds, ``torch.linalg.eigh`` (MKL's LAPACK)
with ``scipy.linalg.eigh(driver="evd")`` (scipy's OpenBLAS LAPACK), interleaved, which the
closed form uses on the CPU.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time

import torch


def _busy(stop) -> None:  # pragma: no cover - helper process
    x = 0
    while not stop.is_set():
        x += 1


def _backends(dims, repeat) -> None:
    import scipy.linalg
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    for d in dims:
        x = torch.randn(int(1.4 * d), d, dtype=torch.float64)
        g = x.T @ x
        best = {"torch": float("inf"), "scipy-evd": float("inf")}
        for _ in range(repeat):
            for name in best:
                t = time.process_time()
                if name == "torch":
                    torch.linalg.eigh(g)
                else:
                    with threadpool_limits(limits=1, user_api="blas"):
                        scipy.linalg.eigh(g.numpy(), driver="evd", check_finite=False)
                best[name] = min(best[name], time.process_time() - t)
        print(f"d={d}: torch {best['torch']:.2f} CPU s, scipy evd {best['scipy-evd']:.2f} CPU s, "
              f"torch / scipy {best['torch'] / best['scipy-evd']:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", type=int, nargs="+", default=[785, 2305])
    ap.add_argument("--load", action="store_true", help="run one competing busy process")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--backends", action="store_true", help="torch vs scipy evd, one thread, CPU s")
    a = ap.parse_args()
    if a.backends:
        _backends(a.dims, a.repeat)
        return
    stop = mp.Event()
    proc = mp.Process(target=_busy, args=(stop,)) if a.load else None
    if proc:
        proc.start()
    all_threads = torch.get_num_threads()
    try:
        for d in a.dims:
            x = torch.randn(2 * d, d, dtype=torch.float64)
            g = x.T @ x
            res = {}
            for n in (1, all_threads):
                torch.set_num_threads(n)
                best = float("inf")
                for _ in range(a.repeat):
                    t = time.perf_counter()
                    torch.linalg.eigh(g)
                    best = min(best, time.perf_counter() - t)
                res[n] = best
            torch.set_num_threads(all_threads)
            print(f"d={d}: 1 thread {res[1]:.3f} s, {all_threads} threads {res[all_threads]:.3f} s, "
                  f"ratio {res[all_threads] / res[1]:.2f}{' (with a competing process)' if a.load else ''}")
    finally:
        if proc:
            stop.set()
            proc.join()


if __name__ == "__main__":
    main()
