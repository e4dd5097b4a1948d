"""Numeric policy helpers shared by the states (00-core section 4)."""

from __future__ import annotations


def neumaier_sum(xs) -> float:
    """Serial, fixed-order Neumaier-compensated sum in binary64 (00-core 4: not np.sum, not math.fsum).

    ``t = s + x; c += (s - t) + x if |s| >= |x| else (x - t) + s; s = t``; result ``s + c``.
    """
    s = 0.0
    c = 0.0
    for x in xs:
        x = float(x)
        t = s + x
        if abs(s) >= abs(x):
            c += (s - t) + x
        else:
            c += (x - t) + s
        s = t
    return s + c
