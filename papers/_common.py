"""Plumbing shared by the papers/ runs: logging, CPU clocks, a results.json merged by part, and the
statistics every claim is stated with (binomial standard errors, trends against noise).

    import sys; sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from _common import Results, log, cpu_seconds, prop_se, trend

A run writes `Results(out).save(part, value)` after each part, so parts can be rerun one at a time
(`--only`) and the report rebuilt from the file alone (`--report`).
"""

from __future__ import annotations

import json
import math
import resource
import time
from pathlib import Path

__all__ = ["Results", "log", "cpu_seconds", "prop_se", "trend", "key", "sign_test"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (user + system)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class Results:
    """results.json in `out`, merged by part (written atomically: a crash keeps the old file)."""

    def __init__(self, out: Path):
        self.path = Path(out) / "results.json"

    def load(self) -> dict:
        return json.loads(self.path.read_text()) if self.path.exists() else {}

    def save(self, part: str, value) -> None:
        res = self.load()
        res[part] = value
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(res, indent=1, sort_keys=True))
        tmp.replace(self.path)


def key(v: float) -> str:
    """A sweep value as a results.json key: 0.5 -> '0.5', 2.0 -> '2'."""
    return f"{v:g}"


def prop_se(p: float, n: int) -> float:
    """Binomial standard error of a proportion p measured on n points."""
    return math.sqrt(max(p * (1 - p), 1e-12) / max(n, 1))


def trend(values: list[float], direction: int, noise: float) -> tuple[bool, str]:
    """Whether `values` move in `direction` (+1 rise, -1 fall): (holds, how), with steps against
    the direction smaller than `noise` counted as flat."""
    d = [direction * (b - a) for a, b in zip(values, values[1:])]
    total = direction * (values[-1] - values[0])
    if total <= noise:
        return False, "does not hold" + (" (moves the other way)" if total < -noise else " (no change beyond noise)")
    if all(x > 0 for x in d):
        return True, "holds, monotonically"
    against = [x for x in d if x <= 0]
    if all(-x < noise for x in against):
        return True, f"holds within noise (largest step against it {max(-x for x in against):.3f} < {noise:.3f})"
    return True, f"holds overall but not monotonically (a step of {max(-x for x in against):.3f} against it)"


def sign_test(a: list, b: list) -> tuple[int, int, float]:
    """(b right where a wrong, a right where b wrong, two-sided exact sign-test p) on paired 0/1 outcomes."""
    bw = sum(1 for x, y in zip(a, b) if y and not x)
    aw = sum(1 for x, y in zip(a, b) if x and not y)
    m = bw + aw
    if m == 0:
        return bw, aw, 1.0
    tail = sum(math.comb(m, i) for i in range(0, min(bw, aw) + 1)) / 2 ** m
    return bw, aw, min(1.0, 2 * tail)
