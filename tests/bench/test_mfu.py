"""bench/mfu.py: the analytic FLOP count against hand-written formulas of the configs (exact), against XLA's own
count of the compiled train step on a tiny LLM (a stated ratio bound), the CLI end to end on the tiniest case, the
refusals, and that it imports without grain (the GPU machine has none)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import pytest
from flax import nnx

from bench import mfu
from models.dit import DiT, dit_config
from models.llm import LLM, llm_config
from models.vit import ViT, vit_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BATCH, SEQ = 2, 32


def abstract_params(model_class, config):
    return nnx.state(nnx.eval_shape(lambda: model_class(config, rngs=nnx.Rngs(0))), nnx.Param)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """One end-to-end run of the CLI on the tiniest case (one compile of the LLM step, shared by the tests)."""
    path = str(tmp_path_factory.mktemp("mfu") / "mfu.json")
    result = mfu.main(["--families", "llm", "--sizes", "tiny", "--batch", str(BATCH), "--seq", str(SEQ),
                       "--repeats", "2", "--peak-size", "256", "--json", path])
    with open(path) as fh:
        return result, json.load(fh)


@pytest.mark.parametrize("tied", [True, False])
def test_llm_count_matches_the_formula(tied):
    # PaLM's 6 N D + 12 L H Q T per token, with N the matmul weights: per layer q, k, v, o (GQA: K kv heads) and
    # SwiGLU's three matrices, plus the unembedding (the tied table counts once; an untied input table is a lookup).
    config = llm_config("tiny", tie_embeddings=tied)
    count = mfu.flop_count("llm", config, abstract_params(LLM, config), BATCH, SEQ)
    D, L, N, K, H, F, V = 128, 4, 4, 2, 32, config.resolved_mlp_width, 256
    per_token = L * (2 * D * N * H + 2 * D * K * H + 3 * D * F) + D * V
    assert count.matmul == 6 * per_token * BATCH * SEQ
    assert count.attention == 12 * L * N * H * SEQ * SEQ * BATCH
    assert count.attention_causal == 12 * L * N * H * SEQ * (SEQ + 1) // 2 * BATCH
    assert count.tokens == BATCH * SEQ and count.total == count.matmul + count.attention
    norms = (2 * L + 1) * D  # the vectors: two RMSNorm gains per block and the final one
    assert count.params == per_token + norms + (0 if tied else V * D)  # tied: 820,352, the preset's 0.82M


def test_vit_and_dit_counts_match_the_formulas():
    vit = vit_config("tiny")  # 8x8 digits, patch 4: 4 patches + CLS, width 64, 4 blocks of 4 heads, MLP 128, 10 classes
    count = mfu.flop_count("vit", vit, abstract_params(ViT, vit), BATCH)
    D, F, P, T = 64, 128, 4, 5
    uses = 4 * (4 * D * D + 2 * D * F) * T + 16 * D * P + D * 10  # blocks per token, patch kernel per patch, head once
    assert (count.positions, count.matmul, count.attention) == (T, 6 * uses * BATCH, 12 * 4 * D * T * T * BATCH)
    dit = dit_config("tiny")  # 8x8x1, patch 4: 4 tokens, width 128, 4 blocks, MLP 512, learned sigma (2 channels)
    count = mfu.flop_count("dit", dit, abstract_params(DiT, dit), BATCH)
    D, F, T = 128, 512, 4
    per_token = 4 * (4 * D * D + 2 * D * F) + 16 * D + D * 32  # blocks, patch kernel, final linear (p^2 x 2 ch)
    per_example = 4 * 6 * D * D + 2 * D * D + 256 * D + D * D  # adaLN of blocks and final layer, timestep MLP
    assert count.matmul == 6 * (per_token * T + per_example) * BATCH
    assert count.attention == count.attention_causal == 12 * 4 * D * T * T * BATCH


def test_xla_count_of_a_tiny_llm_step(cli_run):
    # XLA's count of the compiled train step over the analytic count, on the tiny LLM at B=2, T=32 (the reference
    # attention path: T x S below 256^2, every score materialised and counted, no causal saving).
    # Lower bound 1: XLA counts every matmul the analytic count has (and no cheaper way of doing them exists here).
    # Upper bound 1.15: XLA also counts the elementwise work the model-FLOPs definition leaves out: RMSNorm, RoPE,
    # softmax and masking over T^2 scores, SwiGLU, the cross-entropy over 256 logits, the gradient norm and AdamW
    # (~10 FLOPs per parameter per step). At width 128 these are a few percent of the matmuls (measured 1.06).
    row = cli_run[0]["rows"][0]
    assert row["xla_flops"] is not None
    ratio = row["xla_flops"] / row["model_flops"]
    assert 1.0 <= ratio <= 1.15, ratio
    assert row["xla_ratio"] == pytest.approx(ratio)


# slow: two train-step compiles (~60 CPU-s); the default suite checks the same count on the LLM and the formulas.
@pytest.mark.slow
@pytest.mark.parametrize("family", ["vit", "dit"])
def test_xla_count_of_tiny_vision_steps(family):
    # As for the LLM, at batch 64 so that AdamW's per-parameter work is small beside the per-example work. The
    # bound is looser (1.25): at width 64 (ViT) or 128 (DiT) and 4-5 tokens, LayerNorm, GELU, softmax, adaLN's
    # modulate and the loss are a larger share of the matmuls than in the LLM (measured ViT 1.16, DiT 1.07).
    case = mfu.build_case(family, "tiny", batch=64, seq=0)
    ratio = mfu.xla_flops(case.compiled) / case.count.total
    assert 1.0 <= ratio <= 1.25, ratio


# slow: one more train-step compile (~10 CPU-s); the trainer's own tests cover compute_dtype.
@pytest.mark.slow
def test_bfloat16_is_the_trainers_mixed_precision():
    # --dtype bfloat16 runs the step with compute_dtype='bfloat16': float32 masters, the same analytic count.
    case = mfu.build_case("llm", "tiny", batch=BATCH, seq=SEQ, dtype="bfloat16")
    plain = mfu.flop_count("llm", llm_config("tiny"), abstract_params(LLM, llm_config("tiny")), BATCH, SEQ)
    assert case.count == plain
    (step_ms,) = mfu.time_steps(case, repeats=1, warmup=0)
    assert step_ms > 0 and int(case.state["step"]) == 1
    assert {str(leaf.dtype) for leaf in jax.tree.leaves(case.state["params"])} == {"float32"}
    with pytest.raises(ValueError, match="dtype='float16'"):
        mfu.build_case("llm", "tiny", batch=BATCH, seq=SEQ, dtype="float16")


def test_cli_end_to_end(cli_run, capsys):
    result, saved = cli_run
    assert saved == json.loads(json.dumps(result))  # the JSON file is the returned record
    (row,) = saved["rows"]
    assert (row["family"], row["size"], row["tokens"], row["params"]) == ("llm", "tiny", BATCH * SEQ, 820_352)
    assert len(row["step_ms_all"]) == 2 and row["step_ms"] > 0 and row["compile_s"] > 0
    peak = saved["peaks_flops"]["float32"]
    assert peak > 0 and row["mfu"] == pytest.approx(row["model_flops"] / (row["step_ms"] / 1e3) / peak)
    assert row["tflops"] == pytest.approx(row["model_flops"] / (row["step_ms"] / 1e3) / 1e12)
    machine = saved["machine"]
    assert machine["backend"] == "cpu" and machine["jax"] and machine["cpu"] and machine["peak_size"] == 256
    table = mfu.markdown_table(saved["rows"])
    assert table.splitlines()[0].startswith("| family | size | params | tokens/step | step ms | model TFLOP/s |")
    assert "| llm | tiny | 0.82M | 64 |" in table


def test_budget_skips_and_lists(capsys):
    # A budget already spent before the first case: nothing compiles, every case is listed as skipped.
    result = mfu.main(["--families", "llm,dit", "--sizes", "tiny", "--budget", "1e-9", "--peak-size", "32"])
    assert [(r["family"], r["size"], "skipped" in r) for r in result["rows"]] == [("llm", "tiny", True),
                                                                                   ("dit", "tiny", True)]
    assert "| llm | tiny | skipped: over the 1e-09 s budget |" in capsys.readouterr().out


def test_refusals():
    with pytest.raises(SystemExit):
        mfu.parse_args(["--sizes", "no_such_size"])
    with pytest.raises(SystemExit):
        mfu.parse_args(["--families", "llm,gpt"])
    with pytest.raises(SystemExit):
        mfu.parse_args(["--dtype", "float16"])
    assert mfu.parse_args(["--sizes", "tiny,125m", "--families", "llm,vit"]).plan == [
        ("llm", "tiny"), ("llm", "125m"), ("vit", "tiny")]
    with pytest.raises(ValueError, match="not a vit preset this benchmark counts"):
        mfu.model_config("vit", "transnext_micro")  # hierarchical: not in the count's table
    with pytest.raises(ValueError, match="not in the count's table"):
        mfu._weight_uses("llm", llm_config("tiny"), "new_layer/kernel_dd", 8)


def test_imports_without_grain():
    # The GPU image has jax, flax and optax but no grain: the task modules must still import (their data pipelines
    # are never used here). None in sys.modules makes `import grain` fail, as if it were not installed.
    code = ("import sys\n"
            "sys.modules['grain'] = None  # what Python does for a package that must not import\n"
            "from bench import mfu\n"
            "print(sys.modules['grain'].__doc__)\n")
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "stand-in for the missing grain package" in out.stdout
