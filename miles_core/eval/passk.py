"""pass@k: the chance that at least one of k samples is correct, estimated from n >= k samples.

The unbiased estimator (Chen et al., 2021) is 1 - C(n-c, k) / C(n, k) for c correct samples.
The binomials overflow floats for n in the hundreds, so it is computed as the equal product
1 - prod_{i=n-c+1}^{n} (1 - k/i), which stays in [0, 1] and exact to rounding for any n.
"""

from __future__ import annotations

import math
import numbers

from miles_core.errors import MilesError

__all__ = ["pass_at_k"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for `c` correct out of `n` samples; needs 0 <= c <= n and 1 <= k <= n."""
    if not all(isinstance(x, numbers.Integral) for x in (n, c, k)):
        raise MilesError(f"pass_at_k takes integers, got n={n!r}, c={c!r}, k={k!r}")
    n, c, k = int(n), int(c), int(k)
    if not 0 <= c <= n:
        raise MilesError(f"pass_at_k: need 0 <= c <= n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise MilesError(f"pass_at_k: need 1 <= k <= n, got k={k}, n={n} (generate at least k samples)")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))
