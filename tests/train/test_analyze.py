"""`python -m train.analyze`: tiny LLM and ViT runs trained one step through the gin CLI path, then each mode writes
its files with sane values; the DiT's maps run under -m slow; usage errors exit 2 with a clear message."""

import json
import pathlib

import gin
import numpy as np
import pytest

from train import analyze

import gin_runs  # tests/train/gin_runs.py

FAMILIES = {
    "llm": (["configs/quickstart.gin"],
            ["WIDTH = 32", "DEPTH = 2", "NUM_HEADS = 2", "NUM_KV_HEADS = 1", "SEQ_LEN = 24", "BATCH_SIZE = 8",
             "llm.LLMConfig.mlp_width = 64", "byte_lm.ByteLMData.validation_bytes = 512"]),
    "vit": (["configs/experiments/vit_digits.gin"],
            ["WIDTH = 8", "DEPTH = 2", "NUM_HEADS = 2", "MLP_WIDTH = 16", "BATCH_SIZE = 8"]),
    "dit": (["configs/experiments/dit_digits.gin"],
            ["WIDTH = 16", "DEPTH = 1", "NUM_HEADS = 2", "BATCH_SIZE = 8", "NUM_TIMESTEPS = 40",
             "SAMPLING_STEPS = 2"]),
}


@pytest.fixture(autouse=True)
def clear_gin():
    yield
    gin.clear_config()


def train_one_step(family: str, workdir: pathlib.Path, corpus: pathlib.Path) -> pathlib.Path:
    files, bindings = FAMILIES[family]
    return gin_runs.train_one_step(files, bindings, workdir, corpus if family == "llm" else None)


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory, corpus):
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = train_one_step(family, tmp_path_factory.mktemp(family), corpus)
        return cache[family]

    return get


def run(mode, workdir, out, *extra):
    assert analyze.main([mode, "--workdir", str(workdir), "--out", str(out), *extra]) == 0
    return json.loads((out / f"{mode}.json").read_text())


def test_llm_maps_are_causal_stochastic_per_layer_and_head(workdirs, tmp_path):
    record = run("maps", workdirs("llm"), tmp_path)
    assert (tmp_path / "maps.png").stat().st_size > 1000 and record["step"] == 1
    assert record["layers"] == ["blocks.0.attention", "blocks.1.attention"]
    assert record["shapes"]["blocks.0.attention"] == [1, 2, 24, 24]
    entropy = np.asarray(list(record["mean_row_entropy_nats"].values()))
    # causal rows over 1..24 keys: between 0 and the mean of log(t)
    assert entropy.shape == (2, 2) and np.all(entropy >= 0)
    assert np.all(entropy <= np.mean(np.log(np.arange(1, 25))) + 1e-5)


def test_llm_heads_ablation_table(workdirs, tmp_path):
    record = run("heads", workdirs("llm"), tmp_path)
    assert (tmp_path / "heads.png").is_file()
    base, ablated = record["base_loss"], np.asarray(record["ablated_loss"])
    assert 0 < base < 10 and ablated.shape == (2, 2) and np.all(np.isfinite(ablated))
    np.testing.assert_allclose(record["delta"], ablated - base, atol=1e-9)
    assert np.any(np.abs(ablated - base) > 0)  # zeroing a head changes the loss
    assert [row["rank"] for row in record["ranking"]] == [1, 2, 3, 4]
    assert record["ranking"][0]["score"] == pytest.approx(float(np.max(ablated - base)))


def test_llm_retrieval_scores(workdirs, tmp_path):
    record = run("retrieval", workdirs("llm"), tmp_path, "--trials", "2", "--length", "24")
    assert (tmp_path / "retrieval.png").is_file()
    scores = np.asarray(record["mean_score"])
    assert scores.shape == (2, 2) and np.all(scores >= 0) and np.all(scores <= 1)
    for trial in record["trials"]:
        assert len(trial["answer"]) == 4 and 0 <= trial["recall"] <= 1 and len(trial["needle"]) == 4
        start, end = trial["span"]
        assert end - start == 4
    assert record["trials"][0]["depth"] == 0.0 and record["trials"][1]["depth"] == 1.0


def test_needle_prompt_places_the_digits_and_ends_with_the_question():
    hay = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz" * 2, np.uint8)
    prompt, (start, end) = analyze.needle_prompt(hay, 24, 0.5, b"1234")
    text = bytes(prompt.astype(np.uint8))
    assert len(prompt) == 24 and text[start:end] == b"1234" and text.endswith(b"#k=")
    assert text[start - 3:start] == b"#k=" and text[end:end + 1] == b";"
    with pytest.raises(analyze.AnalyzeError, match="--length"):
        analyze.needle_prompt(hay, 10, 0.5, b"1234")


def test_vit_maps_with_rollout_and_heads(workdirs, tmp_path):
    record = run("maps", workdirs("vit"), tmp_path)
    assert (tmp_path / "rollout.png").is_file() and "rollout.png" in record["files"]
    rollout = np.asarray(record["rollout"])
    assert rollout.ndim == 2 and np.all(rollout >= 0) and rollout.sum() <= 1 + 1e-5  # the class row's patch part
    heads = run("heads", workdirs("vit"), tmp_path)
    assert np.asarray(heads["delta"]).shape == (2, 2)


def test_usage_errors_exit_2(workdirs, tmp_path, capsys):
    assert analyze.main(["maps", "--workdir", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert analyze.main(["retrieval", "--workdir", str(workdirs("vit")), "--out", str(tmp_path)]) == 2
    assert "needs a language model" in capsys.readouterr().err


@pytest.mark.slow
def test_dit_maps_and_heads(workdirs, tmp_path):
    record = run("maps", workdirs("dit"), tmp_path)
    assert len(record["layers"]) == 1 and (tmp_path / "maps.png").is_file()
    heads = run("heads", workdirs("dit"), tmp_path)
    assert np.asarray(heads["delta"]).shape == (1, 2) and np.isfinite(heads["base_loss"])
