"""Why the closed form runs its eigendecomposition on one thread: time ``torch.linalg.eigh`` of a
Gram matrix on 1 thread and on all threads, side by side, idle and with a competing process.

    python benchmarks/eigh_threads.py [--dims 785 2305] [--load]

``--load`` starts one busy process on another core for the duration (as a second job would),
which is when multi-threaded eigh degrades most.  Prints seconds and the ratio threads/1-thread.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", type=int, nargs="+", default=[785, 2305])
    ap.add_argument("--load", action="store_true", help="run one competing busy process")
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
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
