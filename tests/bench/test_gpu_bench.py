"""CPU smoke test of the GPU benchmark harness (bench/gpu_bench.py, bench/gpu.sh): tiny --quick sizes with the
backends restricted to "xla"/"chunked" (plus a name that does not exist, to exercise "not available"), so the test
does not depend on which Pallas kernels exist yet. Checks the JSON schema, the FLOP arithmetic on a hand-computed
case, the budget cut-off, and that the benchmark imports neither flax, grain nor gin (the GPU machine lacks some)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from bench import gpu_bench
from bench.gpu_harness import attention_flops

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STATUSES = {"ok", "skipped", "not available", "failed"}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("gpu_bench"))
    result = gpu_bench.main(["--quick", "--out", out, "--impls", "xla", "no_such_impl", "--head-dims", "16",
                             "--seq", "32", "--sparse-impl", "chunked", "--flash-impls", "no_such_impl", "chunked",
                             "--linear-impls", "chunked", "--linear-seq", "32", "--na-impls", "gather",
                             "--na-baselines", "dense", "masked_dense",
                             "--repeats", "1"])
    with open(os.path.join(out, "gpu_bench.json")) as fh:
        saved = json.load(fh)
    with open(os.path.join(out, "gpu_bench.md")) as fh:
        tables = fh.read()
    return result, saved, tables


def test_flops_hand_computed():
    # B=2, T=3, S=5, N=4, H=8: forward 4 * 2*4*3*5*8 = 3840; causal halves it; fwd+bwd is 3.5x.
    assert attention_flops(2, 3, 5, 4, 8, False, "fwd") == 3840
    assert attention_flops(2, 3, 5, 4, 8, True, "fwd") == 1920
    assert attention_flops(2, 3, 5, 4, 8, True, "fwd+bwd") == 6720
    with pytest.raises(ValueError, match="mode"):
        attention_flops(2, 3, 5, 4, 8, True, "bwd")


def test_json_schema(quick):
    result, saved, _ = quick
    assert saved["schema"] == gpu_bench.SCHEMA
    assert saved["machine"]["backend"] == "cpu" and saved["machine"]["jax"] and saved["machine"]["device"]
    assert saved["date"][:4].isdigit() and "FlashAttention" in saved["convention"]
    assert saved["matmul"]["size"] == gpu_bench.QUICK["matmul"] and saved["matmul"]["flops_per_s"] > 0
    assert saved["goals"][0].startswith("# --quick") and all(g.startswith("# goal") for g in saved["goals"][1:])
    assert len(saved["rows"]) == len(result["rows"])
    sections = {r["section"] for r in saved["rows"]}
    assert sections == {"softmax", "block_sparse", "linear", "neighborhood"}
    for r in saved["rows"]:
        assert r["status"] in STATUSES, r
        assert r["mode"] in ("fwd", "fwd+bwd") and r["dtype"] == "bfloat16"
        assert r["status"] == "ok" or r["reason"], r
        if r["status"] == "ok":
            assert r["seconds"] > 0 and r["compile_s"] >= 0
        if r["status"] == "ok" and "flops" in r:
            assert math.isclose(r["tflops"], r["flops"] / r["seconds"] / 1e12, rel_tol=1e-9)
            assert math.isclose(r["frac_matmul"], r["flops"] / r["seconds"] / saved["matmul"]["flops_per_s"],
                                rel_tol=1e-9)
        if r["status"] == "ok" and "tokens_per_s" in r:
            assert math.isclose(r["tokens_per_s"], r["B"] * r["S"] / r["seconds"], rel_tol=1e-9)


def test_softmax_rows(quick):
    _, saved, tables = quick
    soft = [r for r in saved["rows"] if r["section"] == "softmax"]
    # 1 head dim x 1 length x 2 causal x 2 passes x 2 implementations
    assert len(soft) == 8
    for r in soft:
        assert r["B"] * r["S"] == gpu_bench.QUICK["tokens"] and r["N"] * r["H"] == gpu_bench.QUICK["width"]
        assert r["flops"] == attention_flops(r["B"], r["T"], r["S"], r["N"], r["H"], r["causal"], r["mode"])
        if r["impl"] == "xla":
            assert r["status"] == "ok", r
        else:
            assert r["status"] == "not available" and "no_such_impl" in r["reason"]
    checked = [r for r in soft if "check" in r]
    assert len(checked) == 2 and all(r["check"]["ok"] for r in checked)  # xla forward vs reference, per causal
    assert "### Softmax attention, head dim 16" in tables and "`no_such_impl`" in tables


def test_other_sections(quick):
    _, saved, tables = quick
    rows = saved["rows"]
    sparse = [r for r in rows if r["section"] == "block_sparse"]
    assert [r["sparsity"] for r in sparse] == [0.0, 0.5, 0.75, 0.9] * 2
    assert all(r["status"] == "ok" for r in sparse)
    assert all(r["density"] <= 1.0 for r in sparse) and sparse[0]["density"] == 1.0
    linear = {(r["impl"], r["status"]) for r in rows if r["section"] == "linear"}
    assert ("lightning_chunked", "ok") in linear and ("dense_chunked", "ok") in linear
    assert ("dense_no_such_impl", "not available") in linear  # falls through to the next baseline
    na = {(r["impl"], r["status"]) for r in rows if r["section"] == "neighborhood"}
    assert {("na_gather", "ok"), ("dense_chunked", "ok"), ("masked_dense_chunked", "ok")} <= na
    for title in ("### Block-sparse attention (chunked)", "### Linear attention", "### Neighborhood attention 2-D"):
        assert title in tables


def test_budget_skips_cases(tmp_path):
    result = gpu_bench.main(["--quick", "--out", str(tmp_path), "--budget", "0", "--sections", "softmax",
                             "--impls", "xla", "--head-dims", "16", "--seq", "32", "--modes", "fwd"])
    assert result["skipped_for_budget"] == 2  # causal and not, forward only
    assert {(r["status"], r["mode"]) for r in result["rows"]} == {("skipped", "fwd")}
    assert json.loads((tmp_path / "gpu_bench.json").read_text())["skipped_for_budget"] == 2


def test_failing_section_does_not_stop_the_run(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(gpu_bench, "run_linear", boom)
    result = gpu_bench.main(["--quick", "--out", str(tmp_path), "--budget", "0", "--sections", "linear",
                             "block_sparse", "--sparse-impl", "chunked"])
    assert "boom" in result["section_errors"]["linear"]
    assert {r["section"] for r in result["rows"]} == {"block_sparse"}


def test_random_block_mask():
    bm = gpu_bench.random_block_mask(64, 0.9)
    assert bm.shape == (64, 64) and bm.dtype == bool and np.all(np.diag(bm))
    assert 0.08 < bm.mean() < 0.14  # ~10% kept plus the diagonal


def test_arguments_are_validated():
    with pytest.raises(SystemExit):
        gpu_bench.parse_args(["--quick", "--seq", "48"])  # 48 does not divide the 64 quick tokens
    assert gpu_bench.parse_args(["--quick", "--linear-seq", "128", "32"])[1]["linear_seq"] == (128, 32)  # 128: B=1
    with pytest.raises(SystemExit):
        gpu_bench.parse_args(["--quick", "--impls", "chunked:block_q"])  # no value
    with pytest.raises(SystemExit):
        gpu_bench.parse_args(["--quick", "--impls", "chunked:tile=3"])  # not a Chunked field


def test_implementation_configs():
    """"name:field=value,..." builds the implementation's config object (tile sweeps in one run)."""
    from attnx import Chunked

    assert gpu_bench.implementation("chunked:block_q=32,block_kv=16") == Chunked(block_q=32, block_kv=16)
    assert gpu_bench.implementation("xla") == "xla"
    with pytest.raises(gpu_bench.NotAvailable, match="no_such_impl"):
        gpu_bench.implementation("no_such_impl:block_q=16")


def test_imports_only_jax():
    """The GPU machine has jax but no grain or gin: the benchmark must not import them (nor flax/models/train)."""
    code = ("import sys, bench.gpu_bench, attnx; attnx.list_attentions(); "  # every registered family loaded
            "bad = sorted({m.split('.')[0] for m in sys.modules} & {'grain', 'gin', 'flax', 'orbax', 'optax', "
            "'models', 'train', 'tokamax', 'torch'}); print(','.join(bad))")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == "", out.stdout


def test_gpu_sh():
    path = os.path.join(ROOT, "bench", "gpu.sh")
    subprocess.run(["bash", "-n", path], check=True)
    text = open(path).read()
    assert "set -euo pipefail" in text and "-m bench.gpu_bench --out" in text and "XLA_PYTHON_CLIENT_PREALLOCATE" in text
