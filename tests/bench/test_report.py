"""bench/report.py: each formatter on small synthetic JSON (the exact cells), the sections of a missing, unreadable or
unknown JSON and of a benchmark without JSON, where the notes' marker puts the generated block, `--check` on a stale,
missing and fresh file, and that the committed bench/RESULTS.md is what the generator writes. Pure Python."""

from __future__ import annotations

import json
import pathlib

import pytest

from bench import report
from bench.report import Benchmark

ROOT = pathlib.Path(__file__).resolve().parents[2]


def lines_with(text: str, start: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(start)]


def test_attention_cpu_rows_goals_and_skipped_row():
    data = {"matmul_rate": {"float32": 5.0e10}, "args": {"batch": 1, "heads": 8, "head_dim": 64, "repeats": 3},
            "goals": ["# goal: 3.72x faster"],
            "rows": [{"impl": "chunked", "T": 512, "causal": True, "dtype": "float32", "seconds": 0.02216,
                      "tflops": 0.0121, "share_of_matmul_rate": 0.2265, "speedup_vs_jax_nn": 1.184,
                      "total_bytes": 19.5 * 2 ** 20},
                     {"impl": "jax_nn", "T": 16384, "causal": False, "dtype": "float32", "skipped": "too big",
                      "total_bytes": 16512 * 2 ** 20},
                     {"impl": "chunked", "T": 16384, "causal": False, "dtype": "float32", "seconds": 9.24,
                      "tflops": 0.0297, "share_of_matmul_rate": 0.56, "total_bytes": 2 ** 20}]}
    text = "\n\n".join(report.attention_cpu(data))
    assert "| chunked | float32 | yes | 512 | 0.0222 | 12.1 | 23% | 1.18x | 19.5 |" in text
    assert "| jax_nn | float32 | no | 16384 | not run: too big |  |  |  | 16512.0 |" in text
    assert "| chunked | float32 | no | 16384 | 9.2400 | 29.7 | 56% | - | 1.0 |" in text  # no jax.nn: no ratio
    assert "float32 50.0 GFLOP/s" in text and "```\n# goal: 3.72x faster\n```" in text


def test_vision_digits_softmax_first_then_accuracy_and_bold_maxima():
    rows = [{"mechanism": m, "steps": 840, "wall_s": w, "images_per_second": ips, "test_accuracy": a,
             "test_accuracy_shift_averaged": s}
            for m, w, ips, a, s in [("hilo", 159.2, 272.0, 0.4556, 0.5), ("softmax", 262.7, 456.0, 0.76, 0.8067),
                                    ("lsda", 117.3, 487.6, 0.8689, 0.8822), ("inline", 98.1, 477.7, 0.8556, 0.8956)]]
    body = lines_with(report.vision_digits(rows)[0], "| `")
    assert body == ["| `softmax` | 76.0% | 80.7% | 456 | 263 | 840 |",
                    "| `lsda` | **86.9%** | 88.2% | 488 | 117 | 840 |",
                    "| `inline` | 85.6% | **89.6%** | 478 | 98 | 840 |",
                    "| `hilo` | 45.6% | 50.0% | 272 | 159 | 840 |"]
    assert "| `softmax` | **76.0%** | **80.7%** |" in report.vision_digits({"rows": rows[1:2]})[0]  # standard layout


def test_image_prompt_scales_by_guidance_and_per_class():
    names = [f"lambda_{s}_cfg_{g}" for g in ("1", "1.5") for s in ("0", "1")]
    data = {"scales": [0.0, 1.0], "cfg_scale": 1.5, "num_references": 20, "sampler": "ddim", "sampling_steps": 50,
            "classifier_test_accuracy": 0.984, "encoder_test_accuracy": 0.98, "seconds": 12.0,
            "reference_class_share": dict(zip(names, [0.1, 0.935, 0.1, 0.94])),
            "frechet_distance": dict(zip(names, [121.558, 2.0485, 121.558, 1.6817])),
            "per_class": {names[1]: [1.0, 0.9]}}
    text = "\n\n".join(report.image_prompt(data))
    assert "| 0 | 10.0% / 121.6 | 10.0% / 121.6 |" in text
    assert "| 1 | **93.5%** / 2.05 | **94.0%** / 1.68 |" in text
    assert "| λ 1, guidance 1 | 100% | 90% |" in text


def test_mqar_grid_cells_not_run_stopped_and_solved():
    def cell(m, w, t, d, acc, steps=600):
        return {"mechanism": m, "width": w, "seq_len": t, "num_pairs": d, "accuracy": acc, "steps": steps,
                "seconds": 100.4, "cpu_seconds": 20.6}
    data = {"budget": {"steps": 600, "stop_accuracy": 0.99},
            "results": [cell("softmax", 64, 64, 4, 0.253), cell("softmax", 64, 128, 8, 0.105),
                        cell("based", 128, 64, 4, 0.992, steps=500)]}
    text = "\n\n".join(report.mqar(data))
    assert "| mechanism | d_model | T=64, D=4: accuracy (wall / CPU s) | T=128, D=8 |" in text
    assert "| softmax | 64 | 25.3% (100 / 21) | 10.5% (100 / 21) |" in text
    assert "| based | 128 | **99.2%** (100 / 21, stopped at 500 steps) | not run |" in text
    assert "| softmax | 128 |" not in text and "| based | 64 |" not in text  # rows with no cell at all are left out
    data["budget"]["protocol"] = "mixture"  # one run per row: its seconds only in the first column
    text = "\n\n".join(report.mqar(data))
    assert "| softmax | 64 | 25.3% (100 / 21) | 10.5% |" in text and "first column" in text


def test_mfu_rows_skipped_and_failed():
    data = {"dtype": "float32", "batch": 4, "seq": 256, "repeats": 3, "peaks_flops": {"float32": 1.339e11},
            "rows": [{"family": "llm", "size": "tiny", "params": 820_000, "tokens": 1024, "step_ms": 188.46,
                      "tflops": 0.03524, "xla_ratio": 1.0281, "mfu": 0.263},
                     {"family": "vit", "size": "S/16", "skipped": "over the 400 s budget"},
                     {"family": "dit", "size": "S/4", "error": "XlaRuntimeError: out of memory"}]}
    text = "\n\n".join(report.mfu(data))
    assert "| llm | tiny | 0.82M | 1,024 | 188.5 | 0.03524 | 1.028 | 26.3 |" in text
    assert "| vit | S/16 | skipped: over the 400 s budget |" in text
    assert "| dit | S/4 | failed: XlaRuntimeError: out of memory |" in text
    assert "float32 0.1339 TFLOP/s" in text


def test_listops_and_generic_tables():
    data = {"settings": {"steps": 100}, "majority_label": 7, "majority_baseline": 0.171, "data": {"seq_len": 512},
            "load_average_start": 2.5, "load_average_end": 3.25,
            "rows": [{"mechanism": "softmax", "accuracy": 0.3625, "wall_s": 61.2, "cpu_s": 110.7}]}
    text = "\n\n".join(report.listops(data))
    assert "| `softmax` | 36.2% | 61 | 111 |" in text and "| majority class (7) | 17.1% |  |  |" in text
    assert text.startswith("Settings: steps 100.\n\nData: seq_len 512; load average 2.5 at the start, 3.25 at the end.")
    table = report.generic({"rows": [{"a": 1, "b": 0.123456, "nested": {"x": 1}}, {"a": 2, "c": True}]})[0]
    assert table.splitlines() == ["| a | b | c |", "|---|---|---|", "| 1 | 0.1235 | - |", "| 2 | - | yes |"]


def test_efficiency_lengths_published_skipped_and_never():
    def row(name, times, el=(None, None), pub=(None, None), **extra):
        return dict(mechanism=name, pattern="NS", implementation="default", lengths=[256, 512][:len(times)],
                    time_s=times, memory_bytes=[2 ** 20 * (i + 1) for i in range(len(times))],
                    efficiency_length_time=el[0], efficiency_length_memory=el[1], published_time=pub[0],
                    published_memory=pub[1], note=None, skipped=None, **extra)
    data = {"settings": {"batch": 4}, "commit_note": "curves at abc", "refit_commit": "def", "rows": [
        row("vanilla", [0.0012, 0.0041]), row("performer", [0.002, 0.003], (700.4, 300.0), (2361, 37)),
        row("abc", [0.002], fit_error="time: fewer than 2 lengths"),
        dict(row("lara", []), skipped="supports ['NC'], none of the patterns run (NS)")]}
    text = "\n\n".join(report.efficiency(data))
    assert text.startswith("Settings: batch 4.\n\nRecorded with the results: curves at abc (refit commit def).")
    assert "| mechanism | pattern | ms at L=256 | ms at L=512 | compiled MiB per L |" in text
    assert "| `vanilla` | NS | 1.2 | 4.1 | 1 / 2 |  | - |  |" in text
    assert "| `performer` | NS | 2.0 | 3.0 | 1 / 2 | 700 / 300 | 2361 / 37 |  |" in text
    assert "| `abc` | NS | 2.0 | - | 1 | never / never | - | time: fewer than 2 lengths |" in text
    assert "| `lara` | NS | skipped: supports ['NC'], none of the patterns run (NS) |  |  |  |  |  |" in text


def test_gpu_tables_reused_on_block_sparse_rows():
    rows = [{"section": "block_sparse", "impl": "pallas_gpu", "mode": "fwd", "sparsity": s, "density": 1 - s,
             "seconds": t, "tflops": 300.0, "status": "ok", "S": 32768, "N": 16, "H": 128, "block": 128}
            for s, t in ((0.0, 0.024), (0.9, 0.003))]
    text = "\n\n".join(report.gpu({"rows": rows, "matmul": {"size": 8192, "flops_per_s": 7.9e14}}))
    assert "| fwd | 90% | 0.100 | 0.003 | 300 | 8.00x |" in text
    assert "# goal block-sparse 90% S=32768 fwd: 8.00x over dense (goal >= 7x): met" in text


@pytest.fixture
def bench_dir(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "intro.md").write_text("Machine: a test box.\n")
    (tmp_path / "notes" / "kind.md").write_text("Before the table.\n\n<!-- results -->\n\nAfter: 3 runs.\n")
    (tmp_path / "notes" / "hand.md").write_text("Hand-recorded: 42 s.\n")
    (tmp_path / "kind.json").write_text(json.dumps({"machine": {"cpu": "box", "hostname": "h"}, "date": "2026-01-02",
                                                    "commit": "abc1234", "rows": [{"x": 1.5}]}))
    (tmp_path / "kind.png").write_bytes(b"png")
    return tmp_path


BENCHES = (Benchmark("kind", "Kind", "kind.json", report.generic, ("kind.png", "absent.png")),
           Benchmark("gone", "Gone", "gone.json", report.generic, (), "python -m bench.gone"),
           Benchmark("hand", "Hand"))


def test_render_sections_marker_missing_and_hand_recorded(bench_dir):
    text = report.render(bench_dir, BENCHES)
    kind = text[text.index("## Kind"):text.index("## Gone")]
    assert kind.index("Before the table.") < kind.index("| 1.5 |") < kind.index("After: 3 runs.")
    assert "machine: cpu box; date: 2026-01-02; commit: abc1234." in kind and "hostname" not in kind
    assert "![kind](kind.png)" in kind and "absent.png" not in kind
    gone = text[text.index("## Gone"):text.index("## Hand")]
    assert "**Not run yet:** `bench/gone.json` is missing (`python -m bench.gone` writes it)." in gone
    assert not any(ch.isdigit() for ch in gone.replace("gone.json", ""))  # no invented numbers
    hand = text[text.index("## Hand"):]
    assert "writes no JSON" in hand and "Hand-recorded: 42 s." in hand
    assert "Machine: a test box." in text.split("## Kind")[0]


def test_unreadable_unknown_and_misfit_json(bench_dir):
    (bench_dir / "gone.json").write_text("{not json")
    (bench_dir / "new_thing.json").write_text(json.dumps({"benchmark": "newbench", "rows": [{"y": 2}]}))
    text = report.render(bench_dir, BENCHES + (Benchmark("misfit", "Misfit", "kind.json", report.mqar),))
    assert "`bench/gone.json` could not be read (JSONDecodeError" in text
    assert "## newbench (`bench/new_thing.json`)" in text and "| y |\n|---|\n| 2 |" in text
    assert "The `misfit` formatter does not understand this JSON: KeyError: 'results'" in text


def test_check_detects_stale_missing_and_fresh(bench_dir, capsys):
    out = bench_dir / "RESULTS.md"
    args = ["--bench-dir", str(bench_dir)]
    assert report.main(args + ["--check"]) == 1  # missing
    assert report.main(args) == 0 and out.exists()
    assert report.main(args + ["--check"]) == 0
    (bench_dir / "notes" / "intro.md").write_text("Machine: another box.\n")
    assert report.main(args + ["--check"]) == 1  # a notes edit makes the file stale
    report.main(args)
    out.write_text(out.read_text().replace("another", "edited"))
    assert report.main(args + ["--check"]) == 1  # a hand edit of RESULTS.md too
    assert "is stale" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        report.main(["--bench-dir", str(bench_dir / "nowhere")])


def test_committed_results_are_generated():
    """bench/RESULTS.md must be what `python -m bench.report` writes from the committed JSON and notes."""
    assert report.render() == (ROOT / "bench" / "RESULTS.md").read_text(), "run `python -m bench.report`"
