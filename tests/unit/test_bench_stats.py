"""`bench.stats.quantile_shift`: a quantile's difference between two samples, with its interval."""

from __future__ import annotations

import random

from bench.stats import quantile_shift


def test_a_sample_moved_by_half_a_millisecond_shifts_every_quantile_by_it() -> None:
    before = [i / 1000 for i in range(1, 401)]  # 1..400 ms
    after = [x + 0.0005 for x in before]
    point, low, high = quantile_shift(before, after, 0.99)
    assert point == 0.5
    assert low <= 0.5 <= high


def test_noise_gives_an_interval_around_no_difference_and_a_real_shift_lies_outside_it() -> None:
    rng = random.Random(7)
    before = [rng.lognormvariate(0.0, 0.5) / 1000 for _ in range(2000)]
    same = [rng.lognormvariate(0.0, 0.5) / 1000 for _ in range(2000)]
    _, low, high = quantile_shift(before, same, 0.99)
    assert low < 0.0 < high
    _, low, _ = quantile_shift(before, [x + 0.002 for x in same], 0.99)
    assert low > 0.0


def test_the_interval_is_the_same_for_the_same_samples_and_empty_samples_give_zeros() -> None:
    rng = random.Random(3)
    before = [rng.random() / 100 for _ in range(300)]
    after = [rng.random() / 100 for _ in range(300)]
    assert quantile_shift(before, after, 0.99) == quantile_shift(before, after, 0.99)
    assert quantile_shift([], after, 0.99) == (0.0, 0.0, 0.0)
