"""U-IDS and P-IDS (Co-Mod-GAN, Zhao et al. ICLR'21, ``metrics/inception_discriminative_score.py``).

A linear SVM (``sklearn.svm.LinearSVC(dual=False)``) is fitted on Inception features of N real images
(label 1) and their N inpainted counterparts (label 0; fake *i* comes from real *i*).

* U-IDS = misclassification rate of the fitted SVM on its own training set (1 − accuracy).
* P-IDS = fraction of pairs with ``decision(fake_i) > decision(real_i)``.

Both are in [0, 0.5] in practice (higher = harder to tell apart); papers print them as percentages.
``pca_dim`` optionally PCA-reduces the joint features first, as ASUKA's ``eval/cal_ids.py`` does when its
resolution argument (512 or 1024) is passed as the dimension; Co-Mod-GAN uses none (the default).
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.decomposition import PCA
from sklearn.svm import LinearSVC

#: IDS is reported for a group of N pairs only when N >= IDS_PAIRS_PER_DIM * (D + 1), D the SVM's input dimension
#: (after PCA). 2N points in general position in D dimensions are linearly separable for any labels while
#: 2N <= D + 1, and most labelings stay separable up to Cover's capacity 2N = 2 (D + 1): there an SVM tells real from
#: fake even when both come from one distribution (U = P = 0 at N = 500, D = 2048). At N = 4 (D + 1) (4× the
#: capacity) same-distribution features give U-IDS ≈ 0.37 instead of the ideal 0.5 (measured, D = 64), still biased
#: but no longer degenerate.
IDS_PAIRS_PER_DIM = 4


def ids_min_pairs(dim: int) -> int:
    """The smallest group (number of pairs) for which U-/P-IDS are reported, for SVM input dimension ``dim``."""
    return IDS_PAIRS_PER_DIM * (dim + 1)


def inception_discriminative_scores(real: torch.Tensor | np.ndarray, fake: torch.Tensor | np.ndarray, *,
                                    pca_dim: int | None = None) -> dict[str, float]:
    """Return ``{"u_ids", "p_ids"}`` for paired feature sets (N, D) in the same order."""
    r = np.asarray(torch.as_tensor(real).detach().cpu().double())
    f = np.asarray(torch.as_tensor(fake).detach().cpu().double())
    if r.ndim != 2 or r.shape != f.shape or r.shape[0] < 2:
        raise ValueError(f"real and fake must be paired (N, D) features with N >= 2, got {r.shape} and {f.shape}.")
    x = np.concatenate([r, f])
    if pca_dim is not None:
        if not 0 < pca_dim <= min(x.shape):
            raise ValueError(f"pca_dim must be in [1, min(2N, D) = {min(x.shape)}], got {pca_dim}.")
        x = PCA(pca_dim, random_state=0).fit_transform(x)
    y = np.concatenate([np.ones(len(r)), np.zeros(len(f))])
    svm = LinearSVC(dual=False).fit(x, y)
    u_ids = 1.0 - svm.score(x, y)
    decision = svm.decision_function(x)
    p_ids = float(np.mean(decision[len(r):] > decision[:len(r)]))
    return {"u_ids": float(u_ids), "p_ids": p_ids}
