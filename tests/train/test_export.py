"""`python -m train.export`: each family's tiny run trained one step through the gin CLI path, exported and checked
(safetensors and StableHLO against the checkpoint's forward pass); the StableHLO runs a symbolic batch of 3 in a
fresh process that imports only jax and numpy; usage errors are clear."""

import json
import pathlib
import subprocess
import sys

import gin
import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from attnx.testing.tolerances import assert_close
from train import export

import gin_runs  # tests/train/gin_runs.py

# Tiny versions of the three families' experiments (batch 8: the 8 fake devices of tests/conftest.py).
FAMILIES = {
    "llm": (["configs/quickstart.gin"],
            ["WIDTH = 32", "DEPTH = 1", "NUM_HEADS = 2", "NUM_KV_HEADS = 1", "SEQ_LEN = 16", "BATCH_SIZE = 8",
             "llm.LLMConfig.mlp_width = 64", "byte_lm.ByteLMData.validation_bytes = 512"]),
    "vit": (["configs/experiments/vit_digits.gin"],
            ["WIDTH = 8", "DEPTH = 1", "NUM_HEADS = 2", "MLP_WIDTH = 16", "BATCH_SIZE = 8"]),
    "dit": (["configs/experiments/dit_digits.gin"],
            ["WIDTH = 16", "DEPTH = 1", "NUM_HEADS = 2", "BATCH_SIZE = 8", "NUM_TIMESTEPS = 40",
             "SAMPLING_STEPS = 2"]),
}


@pytest.fixture(autouse=True)
def clear_gin():
    yield
    gin.clear_config()  # export parses the exported config.gin; leave no bindings to later tests


def train_one_step(family: str, workdir: pathlib.Path, corpus: pathlib.Path) -> pathlib.Path:
    files, bindings = FAMILIES[family]
    return gin_runs.train_one_step(files, bindings, workdir, corpus if family == "llm" else None)


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory, corpus):
    """Trained lazily, once per family for the module."""
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = train_one_step(family, tmp_path_factory.mktemp(family), corpus)
        return cache[family]

    return get


@pytest.fixture(scope="module")
def llm_export(workdirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("llm_export")
    assert export.main(["--workdir", str(workdirs("llm")), "--out", str(out)]) == 0
    return out


def test_llm_export_writes_the_artifacts_and_check_passes(llm_export, capsys):
    names = set(load_file(str(llm_export / export.PARAMS_FILE)))
    assert "blocks.0.attention.query_dnh" in names and all("value" not in name.split(".") for name in names)
    record = json.loads((llm_export / export.SIGNATURE_FILE).read_text())
    assert record["inputs"] == [{"name": "tokens", "shape": ["b", 16], "dtype": "int32"}]
    assert record["output"] == {"shape": ["b", 16, 256], "dtype": "float32"}
    assert record["source"]["step"] == 1 and record["platforms"] == ["cpu"]
    assert (llm_export / "config.gin").read_text() == (
        pathlib.Path(record["source"]["workdir"]) / "config.gin").read_text()
    capsys.readouterr()
    assert export.main(["--check", str(llm_export)]) == 0
    output = capsys.readouterr().out
    assert "params.safetensors: max abs error" in output and "model.stablehlo: max abs error" in output


def test_export_for_several_platforms_at_highest_matmul_precision(workdirs, tmp_path):
    """What a GPU server needs: a cuda lowering beside cpu, with full-float32 dots (default GPU dots are TF32)."""
    assert export.main(["--workdir", str(workdirs("llm")), "--out", str(tmp_path), "--platforms", "cpu,cuda",
                        "--matmul_precision", "highest"]) == 0
    record = json.loads((tmp_path / export.SIGNATURE_FILE).read_text())
    assert record["platforms"] == ["cpu", "cuda"] and record["matmul_precision"] == "highest"
    exported = jax.export.deserialize(bytearray((tmp_path / export.MODEL_FILE).read_bytes()))
    assert exported.platforms == ("cpu", "cuda") and "HIGHEST" in exported.mlir_module()
    assert export.main(["--check", str(tmp_path)]) == 0


# Every family's tiny preset exports and checks in the default suite (issue 9's done-when); the DiT case costs about
# 20 s, its training step compiling the diffusion loss.
@pytest.mark.parametrize("family, inputs, output", [
    ("vit", [{"name": "images", "shape": ["b", 8, 8, 1], "dtype": "float32"}], ["b", 10]),
    pytest.param("dit", [{"name": "x", "shape": ["b", 8, 8, 1], "dtype": "float32"},
                         {"name": "t", "shape": ["b"], "dtype": "int32"},
                         {"name": "y", "shape": ["b"], "dtype": "int32"}],
                 ["b", 8, 8, 2]),
])
def test_image_family_export_then_check_passes(family, inputs, output, workdirs, tmp_path):
    assert export.main(["--workdir", str(workdirs(family)), "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / export.SIGNATURE_FILE).read_text())
    assert record["inputs"] == inputs and record["output"]["shape"] == output
    assert export.main(["--check", str(tmp_path)]) == 0


# Run by a fresh interpreter in isolated mode (-I: no cwd or PYTHONPATH on sys.path): only jax and numpy.
SERVER = """
import json, sys
import jax, numpy as np
out, inputs_path, result_path = sys.argv[1:]
signature = json.load(open(f"{out}/signature.json"))
arrays = np.load(inputs_path)
inputs = [arrays[spec["name"]] for spec in signature["inputs"]]
for spec, array in zip(signature["inputs"], inputs):
    assert str(array.dtype) == spec["dtype"] and len(array.shape) == len(spec["shape"]), spec
exported = jax.export.deserialize(bytearray(open(f"{out}/model.stablehlo", "rb").read()))
np.save(result_path, np.asarray(exported.call(*inputs)))
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("attnx", "flax", "train", "models", "gin", "orbax"))
assert not leaked, leaked
"""


def test_stablehlo_runs_a_batch_of_3_in_a_process_with_only_jax_and_numpy(llm_export, tmp_path):
    tokens = np.random.default_rng(3).integers(0, 256, (3, 16), dtype=np.int32)
    np.savez(tmp_path / "inputs.npz", tokens=tokens)
    subprocess.run([sys.executable, "-I", "-c", SERVER, str(llm_export), str(tmp_path / "inputs.npz"),
                    str(tmp_path / "result.npy")], check=True, timeout=300)
    served = np.load(tmp_path / "result.npy")
    record = json.loads((llm_export / export.SIGNATURE_FILE).read_text())
    rebuilt = export.rebuild(llm_export / "config.gin")
    params, _ = export.checkpoint_params(pathlib.Path(record["source"]["workdir"]), None)
    expected = jax.jit(lambda model, t: model(t))(rebuilt.merge(params), tokens)
    assert served.shape == (3, 16, 256)
    assert_close(served, expected, np.float32, what="served logits at batch 3")


def test_check_fails_on_parameters_that_differ_from_the_checkpoint(llm_export, tmp_path, capsys):
    for path in llm_export.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    params = load_file(str(tmp_path / export.PARAMS_FILE))
    params["blocks.0.attention.query_dnh"] = params["blocks.0.attention.query_dnh"] + 1e-2
    save_file(params, str(tmp_path / export.PARAMS_FILE))
    assert export.main(["--check", str(tmp_path)]) == 1
    assert "mismatch" in capsys.readouterr().err


def test_usage_errors_are_clear(workdirs, tmp_path, capsys):
    workdir = workdirs("llm")
    cases = [
        (["--workdir", str(tmp_path / "missing"), "--out", str(tmp_path / "o")], "does not exist"),
        (["--workdir", str(tmp_path), "--out", str(tmp_path / "o")], "config.gin not found"),
        (["--workdir", str(workdir), "--out", str(tmp_path / "o"), "--step", "7"],
         "no checkpoint at step 7 in " + str(workdir / "checkpoints") + "; available steps: [1]"),
        (["--workdir", str(workdir), "--out", str(tmp_path / "o"), "--platforms", "cpu,gpu"],
         "unknown ['gpu']; allowed: cpu, cuda, rocm, tpu"),
        (["--workdir", str(workdir), "--out", str(tmp_path / "o"), "--matmul_precision", "fp64"],
         "--matmul_precision 'fp64'; allowed: default, high, highest"),
        (["--check", str(tmp_path)], "params.safetensors not found"),
    ]
    for argv, message in cases:
        assert export.main(argv) == 2, argv
        error = capsys.readouterr().err
        assert error.startswith("error:") and message in error, (argv, error)
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "config.gin").write_text((workdir / "config.gin").read_text())
    assert export.main(["--workdir", str(tmp_path / "bare"), "--out", str(tmp_path / "o")]) == 2
    assert "has no checkpoints/ directory" in capsys.readouterr().err


def test_unknown_task_names_the_supported_ones():
    with pytest.raises(export.ExportError, match="cannot export a builtins.object task: supported are "
                                                 "language_model.ByteLanguageModel"):
        export.signature_for(object())
