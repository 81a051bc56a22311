"""bench/efficiency.py: CAB's efficiency length (Zhang et al., 2023, §4.3) on synthetic curves with a known root,
the never-wins and always-wins cases, the time fit that drops short lengths, the refusals, the IQR statistic, and
the benchmark's JSON end to end on the tiniest case."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from bench import efficiency
from bench.efficiency import efficiency_length, iqr_mean

L = np.array([256, 512, 1024, 2048, 4096, 8192], float)


def test_known_root_is_recovered():
    # vanilla 1e-6 L^2 + 1e-3 L + 0.5, efficient 5e-3 L + 2.5: gap 1e-6 L^2 - 4e-3 L - 2 = 0 at L = 2000 + sqrt(6e6).
    fit = efficiency_length(L, 1e-6 * L ** 2 + 1e-3 * L + 0.5, 5e-3 * L + 2.5)
    assert fit.length == pytest.approx(2000 + math.sqrt(6e6), rel=1e-9)
    np.testing.assert_allclose(fit.vanilla, (1e-6, 1e-3, 0.5), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(fit.efficient, (5e-3, 2.5), rtol=1e-9)
    assert fit.used == tuple(L)


def test_root_between_measured_lengths_and_exact_crossing():
    # gap = 1e-6 (L - 1000)(L + 300): efficient wins from L = 1000 on.
    a, r1, r2 = 1e-6, 1000.0, -300.0
    gap = a * (L - r1) * (L - r2)
    eff = 3e-3 * L + 1.0
    assert efficiency_length(L, eff + gap, eff).length == pytest.approx(1000.0, rel=1e-9)


def test_efficient_one_that_never_wins_gives_inf():
    # A vanilla curve that bends down (a < 0, as a noisy CPU fit can give): the gap ends negative, never wins.
    vanilla = 1e-3 * L + 0.1 - 1e-9 * L ** 2
    fit = efficiency_length(L, vanilla, 5e-3 * L + 1.0)
    assert math.isinf(fit.length) and fit.vanilla[0] < 0
    # a = 0 exactly and a steeper efficient slope: the linear gap only shrinks.
    assert math.isinf(efficiency_length(L, 1e-3 * L + 1.0, 2e-3 * L + 2.0).length)


def test_concave_vanilla_fit_is_trusted_up_to_the_longest_length():
    # a < 0 (noise can bend a short vanilla curve down): the efficient one wins on (500, 10000), which holds the
    # longest length 8192: it wins from 500.
    eff = 2e-3 * L + 1.0
    fit = efficiency_length(L, eff - 1e-6 * (L - 500) * (L - 10000), eff)
    assert fit.vanilla[0] < 0 and fit.length == pytest.approx(500.0, rel=1e-9)
    # Winning on (500, 3000) only, losing at 8192: never (the window is not where the fit ends).
    assert math.isinf(efficiency_length(L, eff - 1e-6 * (L - 500) * (L - 3000), eff).length)
    # Winning only below the measured lengths (gap > 0 at L = 0, extrapolated): never.
    assert math.isinf(efficiency_length(L, eff + 1.0 - 1e-6 * L ** 2, eff).length)


def test_efficient_one_cheaper_everywhere_gives_zero():
    # Complex roots (gap > 0 for every L): wins from the start.
    fit = efficiency_length(L, 1e-6 * L ** 2 + 1e-3 * L + 5.0, 1e-3 * L + 1.0)
    assert fit.length == 0.0
    # A linear gap that is positive for every L > 0.
    assert efficiency_length(L, 2e-3 * L + 1.0, 1e-3 * L + 0.5).length == 0.0


def test_min_length_drops_the_short_lengths_from_the_fits():
    vanilla = 1e-6 * L ** 2 + 1e-3 * L + 0.5
    eff = 5e-3 * L + 2.5
    eff_noisy = eff.copy()
    eff_noisy[0] += 100.0  # a compile-dominated or noisy first point, as CAB's L=256
    exact = efficiency_length(L, vanilla, eff).length
    assert efficiency_length(L, vanilla, eff_noisy).length != pytest.approx(exact, rel=1e-3)
    fit = efficiency_length(L, vanilla, eff_noisy, min_length=257)
    assert fit.length == pytest.approx(exact, rel=1e-9) and fit.used == tuple(L[1:])


@pytest.mark.parametrize("args, match", [
    ((L, L[:-1], L), "t_vanilla has 5 values but L has 6"),
    ((L, L, np.ones((2, 3))), "t_eff must be one-dimensional"),
    ((L, L * np.nan, L), "t_vanilla must be finite"),
    ((-L, L, L), "distinct positive lengths"),
    (([256, 256, 512, 1024], [1, 2, 3, 4], [1, 2, 3, 4]), "distinct positive lengths"),
    (([256, 512], [1, 2], [1, 2]), "at least 3 lengths"),
])
def test_bad_inputs_are_refused_by_name(args, match):
    with pytest.raises(ValueError, match=match):
        efficiency_length(*args)


def test_too_few_lengths_after_min_length():
    with pytest.raises(ValueError, match=r"at least 3 lengths >= min_length=1000"):
        efficiency_length(L[:4], L[:4], L[:4], min_length=1000)
    with pytest.raises(ValueError, match="min_length must be a finite number"):
        efficiency_length(L, L, L, min_length=float("nan"))


def test_iqr_mean_ignores_outliers():
    assert iqr_mean([1.0, 2.0, 2.0, 2.0, 2.0, 100.0]) == 2.0
    assert iqr_mean([3.0]) == 3.0
    assert iqr_mean([1.0, 3.0]) == 2.0  # too few calls to drop any
    assert iqr_mean([5.0, 1.0, 9.0]) == 5.0  # the median
    assert iqr_mean(list(range(100))) == pytest.approx(np.mean(range(25, 75)))
    with pytest.raises(ValueError, match="iqr_mean: times must be a non-empty"):
        iqr_mean([])


@pytest.mark.parametrize("argv, match", [(["--lengths", "0", "8"], "--lengths must be positive"),
                                         (["--heads", "3"], "divisible by --heads 3"),
                                         (["--patterns", "first", "NS"], "'first' cannot be combined")])
def test_cli_refusals(argv, match, capsys):
    with pytest.raises(SystemExit):
        efficiency.parse_args(argv)
    assert match in capsys.readouterr().err


def test_benchmark_json_end_to_end(tmp_path):
    """Tiniest run: vanilla, one efficient mechanism, one that runs no chosen pattern; the JSON layout of the issue."""
    out = tmp_path / "eff.json"
    efficiency.main(["--lengths", "8", "16", "24", "--mechanisms", "performer", "conditional_cross",
                     "--batch", "1", "--model-dim", "16", "--heads", "2", "--repeats", "3",
                     "--time-min-length", "0", "--out", str(out), "--plot", str(tmp_path / "eff.png")])
    data = json.loads(out.read_text())
    assert data["benchmark"] == "efficiency_length"
    assert {"machine", "date", "commit", "settings", "rows"} <= set(data)
    rows = {(r["mechanism"], r["pattern"]): r for r in data["rows"]}
    assert set(rows) == {("vanilla", "NS"), ("performer", "NS"), ("conditional_cross", "-")}
    perf = rows[("performer", "NS")]
    for key in ("mechanism", "pattern", "lengths", "time_s", "memory_bytes", "efficiency_length_time",
                "efficiency_length_memory", "skipped"):
        assert key in perf
    assert perf["lengths"] == [8, 16, 24] and perf["skipped"] is None
    assert all(t > 0 for t in perf["time_s"]) and all(m > 0 for m in perf["memory_bytes"])
    assert perf["published_time"] == 2361 and perf["published_memory"] == 37
    for fit in (perf["fit_time"], perf["fit_memory"]):
        assert len(fit["vanilla"]) == 3 and len(fit["efficient"]) == 2
    assert "NC" in rows[("conditional_cross", "-")]["skipped"]
    assert (tmp_path / "eff.png").stat().st_size > 0
    # --refit recomputes the same efficiency lengths from the stored curves, and a stricter time fit needs 3 lengths.
    refitted = efficiency.main(["--refit", str(out), "--time-min-length", "0"])
    again = {(r["mechanism"], r["pattern"]): r for r in refitted["rows"]}[("performer", "NS")]
    assert again["efficiency_length_time"] == perf["efficiency_length_time"]
    assert again["efficiency_length_memory"] == perf["efficiency_length_memory"]
    efficiency.main(["--refit", str(out), "--time-min-length", "10"])
    strict = {(r["mechanism"], r["pattern"]): r for r in json.loads(out.read_text())["rows"]}[("performer", "NS")]
    assert strict["efficiency_length_time"] is None and strict["fit_time"] == {}
    assert "time: efficiency_length: needs at least 3 lengths" in strict["fit_error"]
    assert strict["efficiency_length_memory"] == perf["efficiency_length_memory"]


def test_cross_patterns_backward_and_attention_only(tmp_path):
    """The other code paths: NC (second input with S = L), forward+backward, no projections; one vanilla per pattern."""
    out = tmp_path / "eff.json"
    data = efficiency.main(["--lengths", "8", "16", "24", "--mechanisms", "performer", "--patterns", "NS", "NC",
                            "--batch", "1", "--model-dim", "16", "--heads", "2", "--repeats", "2", "--backward",
                            "--attention-only", "--time-min-length", "0", "--out", str(out), "--plot", ""])
    keys = [(r["mechanism"], r["pattern"]) for r in data["rows"]]
    assert keys == [("vanilla", "NS"), ("performer", "NS"), ("vanilla", "NC"), ("performer", "NC")]
    assert data["settings"]["module"] == "attention only" and data["settings"]["backward"] is True
    assert all(r["skipped"] is None and len(r["time_s"]) == 3 for r in data["rows"])
    assert all(np.isfinite(r["time_s"]).all() for r in data["rows"])
    assert data["rows"][1]["fit_error"] is None and data["rows"][3]["fit_error"] is None
