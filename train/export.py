"""Checkpoint export for serving: `python -m train.export --workdir W --out DIR [--step N] [--platforms cpu,cuda]
[--matmul_precision highest]`.

Writes, from the newest (or the chosen) checkpoint of a `python -m train` workdir:
    params.safetensors   the parameters, flat names of the module tree (`blocks.0.attention.query_dnh`)
    config.gin           the run's resolved configuration (copied), from which the model is rebuilt
    model.stablehlo      `jax.export` of the model's forward pass with the parameters baked in as constants and a
                         symbolic batch dimension "b": it reloads and runs with only jax installed,
                         `jax.export.deserialize(open(path, 'rb').read()).call(*inputs)`
    signature.json       the inputs (names, shapes with "b" for the batch, dtypes), the output, the method exported

`python -m train.export --check DIR [--workdir W]` rebuilds the model from DIR/config.gin with the weights of
DIR/params.safetensors, deserialises DIR/model.stablehlo, runs both on a fixed seeded batch of 2 and compares them
with the checkpoint's own forward pass (the workdir recorded in signature.json unless --workdir is given) at the
float32 tolerance of attnx.testing.tolerances; prints the largest absolute error of each artifact; exit status 1 on a
mismatch, 2 on a usage error (missing workdir, checkpoint or config, unknown step or platform).

--matmul_precision is baked into the StableHLO's float32 dots: "default" lets each platform pick its fast path
(on NVIDIA GPUs TF32: measured max abs error 2e-3 in the tiny LLM's logits against CPU on an H100), "highest" keeps
full float32 (1.9e-6 on the same check) at the cost of slower matmuls.

The exported forward passes (evaluation mode, `model.eval()`), by task:
    language_model.ByteLanguageModel             LLM.__call__(tokens int32 [b, seq_len]) -> logits [b, seq_len, vocab]
    image_classification.ImageClassification    model.__call__(images float32 [b, H, W, C]) -> logits [b, classes]
    image_diffusion.ClassConditionalDiffusion   DiT.__call__(x float32 [b, H, W, C], t int32 [b], y int32 [b])
                                                 -> noise prediction (and variance values) [b, H, W, out_channels]
"""

import argparse
import dataclasses
import json
import pathlib
import shutil
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from train import gin_config

PARAMS_FILE = "params.safetensors"
MODEL_FILE = "model.stablehlo"
SIGNATURE_FILE = "signature.json"
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
PRECISIONS = ("default", "high", "highest")
CHECK_BATCH = 2
CHECK_SEED = 0


class ExportError(ValueError):
    """A usage error: missing workdir, checkpoint or config, an unknown step, platform or task."""


@dataclasses.dataclass(frozen=True)
class Signature:
    """What the exported forward pass takes: (name, shape after the batch dimension, dtype) per input."""
    method: str
    inputs: tuple[tuple[str, tuple[int, ...], str], ...]
    forward: Callable[..., jax.Array]  # (model, *inputs) -> output
    sample: Callable[[np.random.Generator, int], tuple[np.ndarray, ...]]  # seeded inputs for --check


def signature_for(task: Any) -> Signature:
    """The forward pass to export for `task`; ExportError for a task this module does not know."""
    from train.image_classification import ImageClassification
    from train.image_diffusion import ClassConditionalDiffusion
    from train.language_model import ByteLanguageModel

    if type(task) is ByteLanguageModel:
        if task.landmark_block_size is not None:
            raise ExportError("a byte LM with landmark attention lays its inputs out with landmark tokens; export "
                              "supports the plain byte LM only")
        seq_len, vocab = task.data.seq_len, task.model.vocab_size
        return Signature(
            method="LLM.__call__(tokens) -> logits", inputs=(("tokens", (seq_len,), "int32"),),
            forward=lambda model, tokens: model(tokens),
            sample=lambda rng, b: (rng.integers(0, vocab, (b, seq_len), dtype=np.int32),))
    if type(task) is ImageClassification:
        (height, width), channels = task.model.image_hw, task.model.channels
        return Signature(
            method=f"{type(task).__name__}.build_model(...).__call__(images) -> logits",
            inputs=(("images", (height, width, channels), "float32"),),
            forward=lambda model, images: model(images),
            sample=lambda rng, b: (rng.uniform(0, 1, (b, height, width, channels)).astype(np.float32),))
    if type(task) is ClassConditionalDiffusion:
        size, channels = task.model.input_size, task.model.in_channels
        steps, classes = task.num_timesteps, task.model.num_classes
        return Signature(
            method="DiT.__call__(x, t, y) -> noise prediction",
            inputs=(("x", (size, size, channels), "float32"), ("t", (), "int32"), ("y", (), "int32")),
            forward=lambda model, x, t, y: model(x, t, y),
            sample=lambda rng, b: (rng.standard_normal((b, size, size, channels)).astype(np.float32),
                                   rng.integers(0, steps, (b,), dtype=np.int32),
                                   rng.integers(0, classes, (b,), dtype=np.int32)))
    raise ExportError(f"cannot export a {type(task).__module__}.{type(task).__name__} task: supported are "
                      "language_model.ByteLanguageModel, image_classification.ImageClassification and "
                      "image_diffusion.ClassConditionalDiffusion")


# ---- Rebuilding the model ----

@dataclasses.dataclass
class Rebuilt:
    """The model of a config, split: graph definition (evaluation mode), abstract parameters, other state."""
    task: Any
    graphdef: Any
    abstract_params: Any
    other_state: Any

    def merge(self, params_by_name: dict[str, Any]):
        """The model in evaluation mode with the parameters `params_by_name` (flat names, see `flat_name`)."""
        from flax import nnx

        flat = nnx.to_flat_state(self.abstract_params)
        missing = sorted({flat_name(path) for path, _ in flat} - set(params_by_name))
        extra = sorted(set(params_by_name) - {flat_name(path) for path, _ in flat})
        if missing or extra:
            raise ExportError(f"the parameters do not match the model of the config: missing {missing[:5]}, "
                              f"unexpected {extra[:5]}")
        leaves = []
        for path, variable in flat:
            value = jnp.asarray(params_by_name[flat_name(path)])
            if value.shape != variable.get_value().shape or value.dtype != variable.get_value().dtype:
                raise ExportError(f"parameter {flat_name(path)} is {value.dtype}{list(value.shape)}, the model "
                                  f"wants {variable.get_value().dtype}{list(variable.get_value().shape)}")
            leaves.append((path, variable.replace(value)))
        return nnx.merge(self.graphdef, nnx.from_flat_state(leaves), self.other_state)


def flat_name(path: tuple) -> str:
    return ".".join(str(key) for key in path)


def rebuild(config_path: pathlib.Path) -> Rebuilt:
    """Parses `config_path` (a resolved config.gin) and builds the task's model abstractly (no parameter is
    initialised); the non-parameter state is computed as the trainer does, from `trainer.train.seed`."""
    import gin
    from flax import nnx

    from train import trainer

    if not config_path.is_file():
        raise ExportError(f"config {config_path} not found (a `python -m train` workdir holds config.gin)")
    gin_config.parse([str(config_path)], [])
    bindings = gin.get_bindings(trainer.train)
    if "task" not in bindings:
        raise ExportError(f"{config_path} binds no trainer.train.task")
    task, seed = bindings["task"], bindings.get("seed", 0)
    abstract = nnx.eval_shape(lambda: task.build_model(nnx.Rngs(seed)))
    abstract.eval()
    graphdef, abstract_params, _ = nnx.split(abstract, nnx.Param, ...)
    # One compile; XLA drops the parameter initialisers, only the other state is materialised.
    other_state = jax.jit(lambda: nnx.split(task.build_model(nnx.Rngs(seed)), nnx.Param, ...)[2])()
    return Rebuilt(task, graphdef, abstract_params, other_state)


def checkpoint_params(workdir: pathlib.Path, step: int | None) -> tuple[dict[str, np.ndarray], int]:
    """The parameters (by flat name) of checkpoint `step` of `workdir` (None: the newest), and that step."""
    from train import checkpoint as checkpoint_lib

    directory = workdir / "checkpoints"
    if not workdir.is_dir():
        raise ExportError(f"workdir {workdir} does not exist")
    if not directory.is_dir():
        raise ExportError(f"workdir {workdir} has no checkpoints/ directory (was it trained with checkpoint_every "
                          "> 0?)")
    checkpointer = checkpoint_lib.Checkpointer(directory, async_save=False)
    try:
        steps = checkpointer.all_steps()
        if not steps:
            raise ExportError(f"no checkpoint in {directory}")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise ExportError(f"no checkpoint at step {step} in {directory}; available steps: {steps}")
        state = checkpointer.restore_state(step, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    finally:
        checkpointer.close()
    # Orbax writes each nnx Variable as {"value": array}: drop that last key to get the module path.
    flat, _ = jax.tree_util.tree_flatten_with_path(state["params"])
    params = {}
    for path, leaf in flat:
        keys = [str(getattr(key, "key", getattr(key, "idx", key))) for key in path]
        params[".".join(keys[:-1] if keys[-1] == "value" else keys)] = np.asarray(leaf)
    return params, step


# ---- Export ----

def export(workdir: str | pathlib.Path, out: str | pathlib.Path, *, step: int | None = None,
           platforms: tuple[str, ...] = ("cpu",), matmul_precision: str = "default") -> dict[str, Any]:
    """Writes the four artifacts (module docstring) to `out`; returns the signature written to signature.json."""
    from safetensors.numpy import save_file

    workdir, out = pathlib.Path(workdir).absolute(), pathlib.Path(out)
    platforms = check_platforms(platforms)
    if matmul_precision not in PRECISIONS:
        raise ExportError(f"--matmul_precision {matmul_precision!r}; allowed: {', '.join(PRECISIONS)}")
    if not workdir.is_dir():
        raise ExportError(f"workdir {workdir} does not exist")
    config_path = workdir / gin_config.RESOLVED_CONFIG_FILE
    rebuilt = rebuild(config_path)
    signature = signature_for(rebuilt.task)
    params, step = checkpoint_params(workdir, step)
    model = rebuilt.merge(params)
    out.mkdir(parents=True, exist_ok=True)
    save_file({name: np.ascontiguousarray(value) for name, value in params.items()}, str(out / PARAMS_FILE),
              metadata={"step": str(step)})
    shutil.copyfile(config_path, out / gin_config.RESOLVED_CONFIG_FILE)
    with jax.default_matmul_precision(matmul_precision):  # recorded in each dot of the traced module
        exported = export_forward(model, signature, platforms)
    (out / MODEL_FILE).write_bytes(exported.serialize())
    record = {
        "method": signature.method,
        "inputs": [{"name": name, "shape": ["b", *shape], "dtype": dtype} for name, shape, dtype in signature.inputs],
        "output": {"shape": [d if isinstance(d, int) else "b" for d in exported.out_avals[0].shape],
                   "dtype": str(exported.out_avals[0].dtype)},
        "platforms": list(platforms),
        "matmul_precision": matmul_precision,
        "source": {"workdir": str(workdir), "step": step},
    }
    (out / SIGNATURE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


def export_forward(model, signature: Signature, platforms: tuple[str, ...]):
    """`jax.export` of the forward pass, parameters closed over (constants), batch dimension symbolic."""
    (batch,) = jax.export.symbolic_shape("b")
    specs = [jax.ShapeDtypeStruct((batch, *shape), jnp.dtype(dtype)) for _, shape, dtype in signature.inputs]
    return jax.export.export(jax.jit(lambda *inputs: signature.forward(model, *inputs)), platforms=platforms)(*specs)


def check_platforms(platforms) -> tuple[str, ...]:
    platforms = tuple(platforms)
    unknown = [p for p in platforms if p not in PLATFORMS]
    if unknown or not platforms:
        raise ExportError(f"--platforms {','.join(platforms)!r}: unknown {unknown}; allowed: {', '.join(PLATFORMS)}")
    return platforms


# ---- Check ----

def check(out: str | pathlib.Path, workdir: str | pathlib.Path | None = None, report=print) -> dict[str, float]:
    """Max abs error of the safetensors model and of the deserialised StableHLO against the checkpoint's forward
    pass on a seeded batch of 2; raises AssertionError (naming the artifact) on a mismatch."""
    from safetensors.numpy import load_file

    from attnx.testing.tolerances import assert_close

    out = pathlib.Path(out)
    for name in (PARAMS_FILE, MODEL_FILE, SIGNATURE_FILE, gin_config.RESOLVED_CONFIG_FILE):
        if not (out / name).is_file():
            raise ExportError(f"{out / name} not found: is {out} the --out of an export?")
    record = json.loads((out / SIGNATURE_FILE).read_text())
    workdir = pathlib.Path(workdir if workdir is not None else record["source"]["workdir"])
    rebuilt = rebuild(out / gin_config.RESOLVED_CONFIG_FILE)
    signature = signature_for(rebuilt.task)
    inputs = signature.sample(np.random.default_rng(CHECK_SEED), CHECK_BATCH)
    checkpoint, _ = checkpoint_params(workdir, record["source"]["step"])
    expected = np.asarray(jax.jit(signature.forward)(rebuilt.merge(checkpoint), *inputs))
    outputs = {
        PARAMS_FILE: jax.jit(signature.forward)(rebuilt.merge(load_file(str(out / PARAMS_FILE))), *inputs),
        MODEL_FILE: jax.export.deserialize(bytearray((out / MODEL_FILE).read_bytes())).call(*inputs),
    }
    errors = {}
    for name, output in outputs.items():
        output = np.asarray(output)
        if output.shape != expected.shape:
            raise AssertionError(f"{name}: output shape {output.shape}, the checkpoint's is {expected.shape}")
        errors[name] = float(np.max(np.abs(output.astype(np.float64) - expected)))
        report(f"{name}: max abs error {errors[name]:.3g} against the checkpoint at step {record['source']['step']}")
    for name, output in outputs.items():
        assert_close(output, expected, jnp.float32, what=f"{name} against the checkpoint's forward pass")
    return errors


# ---- Command line ----

def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", help="the `python -m train` workdir (config.gin and checkpoints/)")
    parser.add_argument("--out", help="directory to write the artifacts to")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    parser.add_argument("--platforms", default="cpu", help=f"comma-separated, from {','.join(PLATFORMS)} "
                                                           "(default: cpu)")
    parser.add_argument("--matmul_precision", default="default", help=f"float32 matmul precision baked into the "
                        f"StableHLO, from {', '.join(PRECISIONS)} (default: the platform's fast path)")
    parser.add_argument("--check", metavar="DIR", help="verify the artifacts in DIR instead of exporting")
    args = parser.parse_args(argv)
    if args.check is None and (args.workdir is None or args.out is None):
        parser.error("exporting needs --workdir and --out (or use --check DIR)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.check is not None:
            check(args.check, args.workdir)
            print(f"OK: {args.check} matches the checkpoint")
        else:
            record = export(args.workdir, args.out, step=args.step, platforms=tuple(args.platforms.split(",")),
                            matmul_precision=args.matmul_precision)
            print(f"Exported step {record['source']['step']} ({record['method']}) to {args.out}")
    except (ExportError, gin_config.GinConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except AssertionError as error:
        print(f"error: mismatch: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
