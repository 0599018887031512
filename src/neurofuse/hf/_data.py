"""A synthetic text-classification task for tests, benchmarks and examples: :func:`token_task`."""

from __future__ import annotations

import numpy as np
import torch

from ..data import Dataset
from ..errors import ConfigError

__all__ = ["token_task"]


def token_task(n_train: int = 2000, n_test: int = 1000, seq_len: int = 12, num_classes: int = 6,
               noise_tokens: int = 12, seed: int = 0) -> Dataset:
    """Sequences of token ids whose label is the class whose *two* signature tokens both occur.

    Class ``c`` owns tokens ``1 + c`` and ``1 + C + c`` (``C = num_classes``).  A sequence holds
    both tokens of its class, one token of each of two other classes (so no single token decides
    the label: the model must find the pair) and noise tokens ``1 + 2C ... 2C + noise_tokens``,
    in random order.  Token 0 (BERT's padding id) is never used.

    Parameters
    ----------
    n_train, n_test : int
        Number of training and test sequences.
    seq_len : int
        Tokens per sequence (at least 4).
    num_classes : int
        Number of classes (at least 3).
    noise_tokens : int
        Size of the noise vocabulary (at least 1).
    seed : int
        Seed of the draw.

    Returns
    -------
    Dataset
        ``x_*`` are ``int64`` token ids ``[N, seq_len]``; ``input_shape`` is ``(seq_len,)``;
        the vocabulary size is ``1 + 2 * num_classes + noise_tokens``.
    """
    if seq_len < 4 or num_classes < 3 or noise_tokens < 1 or min(n_train, n_test) < 1:
        raise ConfigError("token_task needs seq_len >= 4, num_classes >= 3, noise_tokens >= 1 and "
                          f"samples >= 1; got {seq_len}, {num_classes}, {noise_tokens}, {n_train}/{n_test}")
    rng = np.random.default_rng(seed)
    c = num_classes

    def draw(n: int):  # type: ignore[no-untyped-def]
        y = rng.integers(0, c, n)
        x = 1 + 2 * c + rng.integers(0, noise_tokens, (n, seq_len))
        for i in range(n):
            others = rng.choice([k for k in range(c) if k != y[i]], 2, replace=False)
            half = rng.integers(0, 2, 2)           # which token of each other class
            toks = [1 + y[i], 1 + c + y[i], *(1 + others + c * half)]
            pos = rng.choice(seq_len, len(toks), replace=False)
            x[i, pos] = toks
        return torch.from_numpy(x.astype(np.int64)), torch.from_numpy(y.astype(np.int64))

    x_tr, y_tr = draw(n_train)
    x_te, y_te = draw(n_test)
    return Dataset("tokens", x_tr, y_tr, x_te, y_te, c, (seq_len,))
