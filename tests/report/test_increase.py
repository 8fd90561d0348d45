"""The exact-increase arithmetic, and chunk planning, on plain numbers."""

from __future__ import annotations

import pytest

from podtally.report.increase import CounterIncrease, exact_increase
from podtally.report.period import Period, parse_duration, plan_chunks

S, E = 1_000_000, 2_000_000  # the window [S, E) in ms


@pytest.mark.parametrize(("samples", "expected"), [
    pytest.param([(S - 60_000, 100), (S + 1, 150), (S + 2, 400)], 300, id="baseline-before-window"),
    pytest.param([(S, 150), (S + 60_000, 170)], 20, id="no-baseline-counts-from-first-sample"),
    pytest.param([(S + 10, 0), (S + 20, 25), (S + 30, 40)], 40, id="zero-first-birth-in-window"),
    pytest.param([(S - 10, 100), (S + 10, 400), (S + 20, 0), (S + 30, 30)], 330,
                 id="reset-to-zero-first"),
    pytest.param([(S - 10, 40), (S + 10, 60), (S + 20, 15), (S + 30, 25)], 45,
                 id="reset-to-nonzero-adds-the-post-reset-value"),
    pytest.param([(S - 10, 100), (S + 10, 20)], 20, id="reset-right-after-the-baseline"),
    pytest.param([(S - 10, 10), (S + 10, 30), (S + 20, 31)], 21, id="series-ends-mid-window"),
    pytest.param([(S - 20, 5), (S - 10, 9)], 0, id="series-ends-before-window"),
    pytest.param([(E, 900), (E + 10, 1000)], 0, id="series-starts-at-end"),
    pytest.param([(S - 10, 90), (S, 100), (E - 1, 110), (E, 1000)], 20, id="start-in-end-out"),
    pytest.param([(S - 10, 5), (S + 10, float("nan")), (S + 20, 7)], 2, id="nan-skipped"),
    pytest.param([], 0, id="no-samples"),
])
def test_exact_increase(samples: list[tuple[int, float]], expected: float) -> None:
    assert exact_increase(samples, S, E) == expected


def test_resets_are_counted() -> None:
    inc = CounterIncrease(S, E).feed_all([(S - 10, 40), (S + 10, 60), (S + 20, 15), (S + 30, 25)])
    assert (inc.value, inc.resets) == (45, 1)


def test_batches_and_repeated_samples_change_nothing() -> None:
    samples = [(S - 10, 100), (S + 10, 400), (S + 20, 0), (S + 30, 30), (S + 40, 90)]
    inc = CounterIncrease(S, E)
    inc.feed_all(samples[:3])
    inc.feed_all(samples[2:])  # overlapping ranges repeat a sample
    assert inc.value == exact_increase(samples, S, E) == 390


def test_periods_add_up() -> None:
    samples = [(0, 0), (S - 5, 7), (S, 10), (S + 5, 3), (E - 1, 8), (E, 12), (E + 5, 1), (E + 9, 4)]
    first, second = exact_increase(samples, S, E), exact_increase(samples, E, E + 10)
    assert first + second == exact_increase(samples, S, E + 10) == 3 + 3 + 5 + 4 + 1 + 3


def test_period_from_days_is_utc_and_ordered() -> None:
    from datetime import date

    p = Period.from_days(date(2024, 1, 2), date(2024, 1, 3))
    assert (p.start_ms, p.end_ms) == (1_704_153_600_000, 1_704_240_000_000)
    with pytest.raises(ValueError, match="must be after"):
        Period.from_days(date(2024, 1, 2), date(2024, 1, 2))


@pytest.mark.parametrize(("text", "ms"), [("5m", 300_000), ("1h30m", 5_400_000), ("2d", 172_800_000),
                                          ("250ms", 250)])
def test_parse_duration(text: str, ms: int) -> None:
    assert parse_duration(text) == ms


@pytest.mark.parametrize("text", ["", "5", "m", "1h 2m", "-1h", "0s", "1y"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_plan_chunks_partition_the_range() -> None:
    chunks = plan_chunks(0, 1000, samples=10, max_per_query=3)
    assert len(chunks) == 4 and chunks[0][0] == 0 and chunks[-1][1] == 1000
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:], strict=False))
    assert plan_chunks(0, 1000, samples=5, max_per_query=100) == [(0, 1000)]
    assert plan_chunks(0, 3, samples=10**9, max_per_query=1) == [(0, 1), (1, 2), (2, 3)]
