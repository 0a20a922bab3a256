"""Statistics of the comparison: mean/SD over cases, paired Wilcoxon signed-rank test, Holm correction."""
from __future__ import annotations

import math
import warnings
from typing import List, Optional, Sequence

import numpy as np


def mean_sd(values: Sequence[float]):
    """Return (mean, sample SD with ddof=1, n) of the finite values; NaN where undefined (n=0, or n=1 for SD).

    NaN values are the cases nnU-Net scores as NaN (empty reference and empty prediction); they are left out as
    nnU-Net's own means (np.nanmean) leave them out.
    """
    finite = np.asarray([v for v in values if not math.isnan(v)], dtype=float)
    mean = float(finite.mean()) if finite.size else float("nan")
    sd = float(finite.std(ddof=1)) if finite.size > 1 else float("nan")
    return mean, sd, int(finite.size)


def paired_wilcoxon(values: Sequence[float], baseline: Sequence[float]):
    """Return (p, n_pairs): scipy.stats.wilcoxon with its defaults on the pairs where both values are finite.

    p is NaN when there is no pair or every difference is zero (scipy has no p-value then).
    """
    from scipy.stats import wilcoxon

    pairs = [(v, b) for v, b in zip(values, baseline) if not math.isnan(v) and not math.isnan(b)]
    if not pairs or all(v == b for v, b in pairs):
        return float("nan"), len(pairs)
    x, y = (np.asarray(column, dtype=float) for column in zip(*pairs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # scipy's warning for tiny samples / ties
        p = float(wilcoxon(x, y).pvalue)
    return p, len(pairs)


def holm(p_values: Sequence[Optional[float]]) -> List[float]:
    """Return Holm's step-down adjusted p-values (same order as the input); NaN entries stay NaN, not counted.

    With the m p-values sorted ascending p_(1) <= ... <= p_(m), the adjusted value of p_(i) is
    max over j <= i of min(1, (m - j + 1) * p_(j)) (Holm 1979), so the adjusted values keep the order.
    """
    valid = [(p, index) for index, p in enumerate(p_values) if p is not None and not math.isnan(p)]
    adjusted = [float("nan")] * len(p_values)
    m = len(valid)
    running_max = 0.0
    for rank, (p, index) in enumerate(sorted(valid)):
        running_max = max(running_max, min(1.0, (m - rank) * p))
        adjusted[index] = running_max
    return adjusted
