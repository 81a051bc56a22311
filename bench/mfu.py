"""Model FLOPs utilisation (MFU) of the project's train step, per model family and size preset.

MFU (Chowdhery et al., 2022, "PaLM", arXiv 2204.02311, Appendix B) is the model's FLOPs per step divided by the step
time, over the machine's peak rate. "Model FLOPs" count only the work the model needs (forward plus backward, no
rematerialisation, no padding), so the number is comparable across implementations. The peak here is not a data
sheet's: it is the rate of a large matrix multiply in the run's dtype, measured in the same run on the same device
(best of a few, before the first case and after each), so CPU and GPU numbers are comparable.

The step is the one the trainer runs: `train.step.make_train_step` with `train.optim.make_optimizer` (clipping +
AdamW), the model built as `train.trainer._initialize` builds it (training-mode graph definition, parameters
initialised under one jit), and the family's task loss on a synthetic batch of the right shape:
`train.language_model.ByteLanguageModel.loss_fn` (LLM), `train.image_classification.ImageClassification.loss_fn`
(ViT), `train.image_diffusion.ClassConditionalDiffusion.loss_fn` (DiT). The tasks validate their model against their
data (256 bytes, 8x8 digits); the losses themselves do not depend on the size, so each task is built with its
default model and then handed the preset's config.

Analytic model FLOPs per step (the formula; `flop_count` implements it):

    model FLOPs = 3 x forward,   forward = 2 x sum_w |w| x uses(w)  +  sum_layers 2 x T x S x N x (H + V)

- w runs over the weight matrices (parameters of rank >= 2), |w| its size, uses(w) how many vectors it multiplies
  per example: every position for the blocks, the LLM's unembedding (the tied embedding counts once, as that
  matmul; an untied input table is a lookup), the patch embeddings (one per patch) and DiT's final linear layer;
  once per example for the ViT head (the pooled token), DiT's adaLN modulations and timestep MLP (applied to the
  conditioning vector). Position tables and biases (added) and label tables (looked up) are not matmuls; norm
  gains are vectors; all are left out (PaLM's 6N counts them: a negligible difference). For the LLM this is
  PaLM's 6N per token.
- The attention term is PaLM's 12 L H Q T per token: the score (QK^T) and value (PV) matmuls, T x S x N x H
  multiply-adds each per layer (H the query/key head size, V the value head size), over all T x S pairs. Causal
  models are not halved (PaLM's convention; what a kernel that skips masked blocks saves shows up as a higher
  MFU); `FlopCount.attention_causal` holds the halved count, T (T + 1) / 2 pairs, for the other convention.
- Backward = 2 x forward (gradients with respect to the inputs and to the weights of each matmul), hence 3 x.

Cross-check: XLA's own count of the compiled step (`Compiled.cost_analysis()["flops"]`) over the analytic count.
It also counts the elementwise work (norms, softmax, activations, the loss, AdamW's ~10 FLOPs per parameter), so
it is a little above 1 where the matmuls dominate (measured 1.01-1.06 on CPU for models of a few million parameters
and more; up to 1.35 for the tiny digits models, whose steps are mostly elementwise work and AdamW). It falls below
1 where the attention skips causal blocks (the chunked CPU path, T x S > 256^2) or runs in a custom call that XLA's
cost model does not count (on GPU, cuDNN attention may count as 0): a cross-check, not the metric.

    python -m bench.mfu                                  # the sizes that fit the backend (CPU: the small ones)
    python -m bench.mfu --families llm --sizes 125m --batch 4 --seq 128 --json out.json
    python -m bench.mfu --dtype bfloat16                 # bf16 compute, float32 masters; against the bf16 peak
    python -m bench.mfu --budget 400 --json $OUT/mfu.json  # on a GPU lease: cases past 400 s are skipped, listed

Needs jax, flax, optax (and scikit-learn for the diffusion task's digits check); not grain or gin (see
`_allow_missing_grain`).
"""

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
import types
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def _allow_missing_grain() -> None:
    """Lets the task modules import where grain is not installed (the GPU image has no grain).

    The task modules import the data pipelines, which import grain at module level and use it only inside
    `train_iterator`, which this benchmark never calls (its batches are synthetic). Without grain, a stand-in
    module whose every attribute is a placeholder lets those modules import (their annotations name grain types);
    touching a placeholder raises. Installed grain is left alone.
    """
    if sys.modules.get("grain") is not None:
        return
    try:
        if importlib.util.find_spec("grain") is not None:
            return
    except (ImportError, ValueError):  # a broken installation counts as missing
        pass

    class _Missing:
        def __init__(self, name: str):
            self._name = name

        def __getattr__(self, attribute: str):
            if attribute.startswith("__"):  # introspection (hasattr, copy, typing) sees a plain object
                raise AttributeError(attribute)
            raise ImportError(f"grain.{self._name} is unavailable: grain is not installed (bench/mfu.py put a "
                              f"stand-in in its place; the data pipelines need the real package)")

        def __call__(self, *args, **kwargs):
            return self.__getattr__("call")

    stand_in = types.ModuleType("grain", "stand-in for the missing grain package, installed by bench/mfu.py")
    stand_in.__getattr__ = _Missing  # module-level __getattr__ (PEP 562): grain.X -> a placeholder
    sys.modules["grain"] = stand_in


_allow_missing_grain()

from models.dit import DiT, dit_config, PRESETS as DIT_PRESETS  # noqa: E402
from models.llm import LLM, llm_config, PRESETS as LLM_PRESETS  # noqa: E402
from models.vit import ViT, vit_config, PRESETS as VIT_PRESETS  # noqa: E402
from train.image_classification import ImageClassification  # noqa: E402
from train.image_diffusion import ClassConditionalDiffusion  # noqa: E402
from train.language_model import ByteLanguageModel  # noqa: E402
from train.optim import OptimizerConfig, make_optimizer  # noqa: E402
from train.step import init_train_state, make_train_step  # noqa: E402

FAMILIES = ("llm", "vit", "dit")
DTYPES = ("float32", "bfloat16")
# Sizes run by default: on CPU those whose step takes seconds on a couple of cores, elsewhere every plain preset.
CPU_SIZES = {"llm": ("tiny", "bench"), "vit": ("tiny", "Ti/16"), "dit": ("tiny", "S/8")}
_PRESETS = {"llm": LLM_PRESETS, "vit": VIT_PRESETS, "dit": DIT_PRESETS}


def family_sizes(family: str) -> tuple[str, ...]:
    """The presets of `family` this benchmark counts: all LLM and DiT presets, the plain (single-stage) ViTs."""
    presets = _PRESETS[family]
    if family == "vit":
        return tuple(name for name, config in presets.items() if not config.stages)
    return tuple(presets)


# ---- The analytic count ----

@dataclasses.dataclass(frozen=True)
class FlopCount:
    """Model FLOPs of one train step (module docstring): weight matmuls and attention, forward + backward."""

    examples: int  # sequences or images per step
    positions: int  # sequence positions per example (LLM: T; ViT: patches + CLS; DiT: patches)
    params: int  # every parameter scalar of the model
    matmul_uses: int  # sum over weight matrices of |w| x uses(w) per example
    attention: float  # training FLOPs of the score and value matmuls, all T x S pairs
    attention_causal: float  # the same counting only the pairs t >= s (= attention for non-causal models)

    @property
    def tokens(self) -> int:
        return self.examples * self.positions

    @property
    def matmul(self) -> float:
        return 6.0 * self.matmul_uses * self.examples

    @property
    def total(self) -> float:
        return self.matmul + self.attention


def _path_name(path) -> str:
    return "/".join(str(getattr(key, "key", getattr(key, "idx", key))) for key in path)


def positions_per_example(family: str, config, seq: int | None) -> int:
    """Sequence positions per example: the LLM's `seq`, ViT patches + CLS token, DiT patches."""
    if family == "llm":
        return seq
    if family == "vit":
        return config.num_patches + (config.pooling == "cls")
    return config.num_patches


def _weight_uses(family: str, config, name: str, positions: int) -> int:
    """uses(w) per example of the weight matrix at `name` (0: not a matmul); unknown matrices raise, so that a new
    weight in a model cannot slip past the count."""
    if "bias" in name:  # biases, some stored per head ([N, H]) or per modulation chunk ([6, D]): added, not multiplied
        return 0
    if family == "llm":
        if name.startswith(("blocks/", "unembed_dv")):
            return positions
        if name.startswith("embed/embedding_vd"):  # tied: the unembedding matmul; untied: a lookup only
            return positions if config.tie_embeddings else 0
    elif family == "vit":
        if name.startswith("stages/0/blocks/"):
            return positions
        if name.startswith("patch_embed/"):
            return config.num_patches
        if name.startswith("head_dc"):
            return 1  # the pooled (CLS) token only
        if name.startswith("position_td"):
            return 0
    elif family == "dit":
        if "/modulation/" in name or name.startswith("timestep_embedder/"):
            return 1  # applied to the conditioning vector c [B, D], once per example
        if name.startswith(("blocks/", "final_layer/", "patch_embed/")):
            return positions
        if name.startswith("label_embedder/"):
            return 0
    raise ValueError(f"flop_count: the {family} weight {name!r} is not in the count's table; add it to "
                     f"bench/mfu.py _weight_uses")


def _attention_forward(family: str, config, positions: int) -> tuple[float, float]:
    """Forward FLOPs of the score and value matmuls per example, (all pairs, causal pairs)."""
    if family == "llm":
        qk, v = config.qk_head_dim or config.resolved_head_dim, config.resolved_head_dim
        layers = [(config.num_heads, qk, v)] * config.depth
        pairs, causal_pairs = positions * positions, positions * (positions + 1) // 2
    else:
        pairs = causal_pairs = positions * positions
        if family == "vit":
            head_dim = config.width // config.num_heads
            layers = [(config.num_heads, head_dim, head_dim)] * config.depth
        else:
            layers = [(heads, head_dim, head_dim) for heads, head_dim in map(config.layer_heads, range(config.depth))]
    per_pair = sum(2 * heads * (qk + v) for heads, qk, v in layers)
    return float(per_pair * pairs), float(per_pair * causal_pairs)


def flop_count(family: str, config, params: Any, batch: int, seq: int | None = None) -> FlopCount:
    """The analytic count for `batch` examples (LLM: of `seq` tokens) of a model with parameter state `params`
    (an nnx.State of nnx.Param, abstract or not)."""
    if family not in FAMILIES:
        raise ValueError(f"flop_count: family={family!r}; allowed: {FAMILIES}")
    if family == "llm" and not (isinstance(seq, int) and seq > 0):
        raise ValueError(f"flop_count: the LLM needs seq, a positive int, got {seq!r}")
    if family == "vit" and config.stages:
        raise ValueError("flop_count: hierarchical ViTs (ViTConfig.stages) are not counted; use a plain preset "
                         f"({', '.join(family_sizes('vit'))})")
    positions = positions_per_example(family, config, seq)
    total = uses = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        size = int(np.prod(leaf.shape))
        total += size
        if len(leaf.shape) >= 2:
            uses += size * _weight_uses(family, config, _path_name(path), positions)
    forward, forward_causal = _attention_forward(family, config, positions)
    return FlopCount(examples=batch, positions=positions, params=total, matmul_uses=uses,
                     attention=3 * forward * batch, attention_causal=3 * forward_causal * batch)


# ---- The step ----

@dataclasses.dataclass
class Case:
    """One (family, size) measurement: the compiled step, its state and batch, and the analytic count."""

    family: str
    size: str
    config: Any
    count: FlopCount
    compiled: Any  # jax.stages.Compiled of the train step
    state: Any
    batch: dict[str, jax.Array]
    compile_seconds: float


def model_config(family: str, size: str):
    """The preset's config (float32 parameters: the trainer's master weights)."""
    if size not in family_sizes(family):
        raise ValueError(f"size {size!r} is not a {family} preset this benchmark counts; allowed: "
                         f"{', '.join(family_sizes(family))}")
    make = {"llm": llm_config, "vit": vit_config, "dit": dit_config}[family]
    return make(size)


def _task_and_model(family: str, config) -> tuple[Any, Callable]:
    """(task whose loss_fn the step uses, model constructor). The task is built with its default (data-sized)
    model, which its checks accept, and then given `config`: its loss reads the config only for options (the
    LLM's landmark layout, DiT's learn_sigma), never for sizes."""
    if family == "llm":
        task, model = ByteLanguageModel(), LLM
    elif family == "vit":
        task, model = ImageClassification(), ViT
    else:
        task, model = ClassConditionalDiffusion(), DiT
    task.model = config
    return task, model


def synthetic_batch(family: str, config, batch: int, seq: int, rng: np.random.Generator) -> dict[str, jax.Array]:
    """A batch of the task's shape and value range: token ids [B, T + 1] (inputs and next-token labels), or
    images [B, H, W, C] in [0, 1] with labels [B]."""
    if family == "llm":
        return {"tokens": jnp.asarray(rng.integers(0, config.vocab_size, (batch, seq + 1)), jnp.int32)}
    if family == "vit":
        shape, classes = (*config.image_hw, config.channels), config.num_classes
    else:
        shape, classes = (config.input_size, config.input_size, config.in_channels), config.num_classes
    return {"image": jnp.asarray(rng.random((batch, *shape)), jnp.float32),
            "label": jnp.asarray(rng.integers(0, classes, batch), jnp.int32)}


def build_case(family: str, size: str, *, batch: int, seq: int, dtype: str = "float32", seed: int = 0) -> Case:
    """Builds the model and train state as the trainer does, and compiles the train step once. dtype 'bfloat16'
    is the trainer's mixed precision (`make_train_step(compute_dtype='bfloat16')`: bfloat16 forward and backward,
    float32 master weights, gradients and AdamW state)."""
    if dtype not in DTYPES:
        raise ValueError(f"build_case: dtype={dtype!r}; allowed: {DTYPES}")
    config = model_config(family, size)
    task, model_class = _task_and_model(family, config)
    tx = make_optimizer(OptimizerConfig(), total_steps=1000)
    # As train.trainer._initialize: the training-mode graph definition from an abstract model, the parameters
    # initialised inside one jit (eagerly, each initializer would be a compiled computation of its own).
    abstract = nnx.eval_shape(lambda: model_class(config, rngs=nnx.Rngs(seed)))
    abstract.train()
    train_graphdef, abstract_params, _ = nnx.split(abstract, nnx.Param, ...)
    count = flop_count(family, config, abstract_params, batch, seq if family == "llm" else None)

    def initial_state():
        _, params, other_state = nnx.split(model_class(config, rngs=nnx.Rngs(seed)), nnx.Param, ...)
        return init_train_state(params, tx, seed), other_state

    state, other_state = jax.jit(initial_state)()
    step = make_train_step(lambda p: nnx.merge(train_graphdef, p, other_state), task.loss_fn, tx,
                           skip_nonfinite=False, compute_dtype=None if dtype == "float32" else dtype)
    data = synthetic_batch(family, config, batch, seq, np.random.default_rng(seed))
    began = time.perf_counter()
    compiled = step.lower(state, data).compile()  # timed and counted: the very executable that runs
    return Case(family, size, config, count, compiled, state, data, time.perf_counter() - began)


def xla_flops(compiled) -> float | None:
    """XLA's FLOP count of a compiled computation, or None where the backend gives none."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # some backends do not implement it  # noqa: BLE001
        return None
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per computation
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return float(flops) if flops is not None and flops >= 0 else None


def time_steps(case: Case, repeats: int, warmup: int = 2) -> list[float]:
    """Seconds of `repeats` warm steps (after `warmup` untimed ones), each waited for to the end. The state is
    donated and replaced, so every step updates the previous one's parameters, as in training."""
    times = []
    for index in range(warmup + repeats):
        began = time.perf_counter()
        case.state, metrics = case.compiled(case.state, case.batch)
        jax.block_until_ready((case.state, metrics))
        if index >= warmup:
            times.append(time.perf_counter() - began)
    return times


def matmul_peak(dtype: str, size: int, repeats: int = 5, calls: int = 3) -> float:
    """FLOP/s of a [size, size] x [size, size] matrix multiply in `dtype` at the default precision (as the
    model's matmuls run): the best of `repeats` rounds of `calls` back-to-back products."""
    rng = np.random.default_rng(0)
    a, b = (jnp.asarray(rng.standard_normal((size, size)), dtype) for _ in range(2))
    matmul = jax.jit(jnp.dot)
    matmul(a, b).block_until_ready()  # compile
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        out = [matmul(a, b) for _ in range(calls)]
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - began) / calls)
    return 2.0 * size**3 / best


# ---- Reporting ----

def machine() -> dict[str, Any]:
    """What ran: device, processor, core counts, jax version and the load average (other processes slow both the
    step and the peak)."""
    device = jax.devices()[0]
    processor = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            processor = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"backend": jax.default_backend(), "device_kind": device.device_kind, "device_count": jax.device_count(),
            "cpu": processor, "cpu_count": os.cpu_count(), "usable_cpus": usable, "jax": jax.__version__,
            "python": platform.python_version()}


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else []


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| family | size | params | tokens/step | step ms | model TFLOP/s | XLA / analytic | MFU % |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        if "error" in row or "skipped" in row:
            what = f"failed: {row['error'][:80]}" if "error" in row else f"skipped: {row['skipped']}"
            lines.append(f"| {row['family']} | {row['size']} | {what} | | | | | |")
            continue
        ratio = "n/a" if row["xla_ratio"] is None else f"{row['xla_ratio']:.3f}"
        lines.append(f"| {row['family']} | {row['size']} | {row['params'] / 1e6:,.2f}M | {row['tokens']:,} | "
                     f"{row['step_ms']:,.1f} | {row['tflops']:.4g} | {ratio} | {100 * row['mfu']:.1f} |")
    return "\n".join(lines)


def machine_line(info: dict[str, Any], peaks: dict[str, float], dtype: str) -> str:
    peak = ", ".join(f"{name} {rate / 1e12:.4g} TFLOP/s" for name, rate in peaks.items())
    return (f"machine: {info['device_kind']} ({info['backend']}, {info['device_count']} device(s)); CPU "
            f"{info['cpu']}, {info['usable_cpus']}/{info['cpu_count']} CPUs usable; jax {info['jax']}; load average "
            f"{info['load_before']} before, {info['load_after']} after; measured matmul peak ({info['peak_size']}^3): "
            f"{peak}; MFU against the {dtype} peak")


def run_case(family: str, size: str, args) -> dict[str, Any]:
    """One case's row (its MFU is added once the run's peak is known)."""
    case = build_case(family, size, batch=args.batch, seq=args.seq, dtype=args.dtype)
    times = time_steps(case, args.repeats)
    step = statistics.median(times)
    count = case.count
    counted = xla_flops(case.compiled)
    return {"family": family, "size": size, "params": count.params, "tokens": count.tokens,
            "examples": count.examples, "positions": count.positions, "step_ms": 1e3 * step,
            "step_ms_all": [1e3 * t for t in times], "compile_s": case.compile_seconds,
            "model_flops": count.total, "matmul_flops": count.matmul, "attention_flops": count.attention,
            "attention_flops_causal": count.attention_causal, "xla_flops": counted,
            "xla_ratio": None if counted is None else counted / count.total,
            "tflops": count.total / step / 1e12}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated, of {', '.join(FAMILIES)}")
    parser.add_argument("--sizes", default=None,
                        help="comma-separated preset names; each family runs those it has (default: on CPU "
                             f"{CPU_SIZES}, elsewhere all plain presets)")
    parser.add_argument("--batch", type=int, default=8, help="examples per step (every family)")
    parser.add_argument("--seq", type=int, default=256, help="LLM tokens per example (ViT/DiT: set by the preset)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per case (median reported)")
    parser.add_argument("--dtype", default="float32",
                        help=f"compute dtype, one of {DTYPES} (bfloat16: float32 master weights, as the trainer's "
                             "compute_dtype); the MFU is against the peak of the same dtype")
    parser.add_argument("--peak-size", type=int, default=None,
                        help="side of the peak matmul (default 2048 on CPU, 8192 on accelerators)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for all cases; cases that would start after it are skipped and listed")
    parser.add_argument("--json", default=None, help="write the results as JSON to this path")
    args = parser.parse_args(argv)
    args.families = tuple(name.strip() for name in args.families.split(",") if name.strip())
    unknown = [name for name in args.families if name not in FAMILIES]
    if unknown or not args.families:
        parser.error(f"--families {unknown or args.families}: allowed {', '.join(FAMILIES)}")
    if args.dtype not in DTYPES:
        parser.error(f"--dtype {args.dtype!r}: allowed {', '.join(DTYPES)}")
    for name in ("batch", "seq", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.budget is not None and args.budget <= 0:
        parser.error(f"--budget must be > 0 seconds, got {args.budget}")
    if args.peak_size is not None and args.peak_size < 16:
        parser.error(f"--peak-size must be >= 16, got {args.peak_size}")
    if args.sizes is None:
        on_cpu = jax.default_backend() == "cpu"
        args.plan = [(f, s) for f in args.families for s in (CPU_SIZES[f] if on_cpu else family_sizes(f))]
    else:
        sizes = [name.strip() for name in args.sizes.split(",") if name.strip()]
        orphans = [s for s in sizes if not any(s in family_sizes(f) for f in args.families)]
        if orphans or not sizes:
            known = {f: family_sizes(f) for f in args.families}
            parser.error(f"--sizes {orphans or sizes}: no chosen family has them; known: {known}")
        args.plan = [(f, s) for f in args.families for s in sizes if s in family_sizes(f)]
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark; prints the machine line and the table; returns (and with --json writes) the results."""
    args = parse_args(argv)
    info = machine()
    info["load_before"] = _load()
    info["peak_size"] = args.peak_size or (2048 if info["backend"] == "cpu" else 8192)
    # Both dtypes on accelerators (their bf16 rate is many times the f32 one); the run's dtype on CPU.
    peak_dtypes = DTYPES if info["backend"] != "cpu" else (args.dtype,)
    samples: dict[str, list[float]] = {name: [] for name in peak_dtypes}

    def measure_peaks():
        for name in peak_dtypes:
            samples[name].append(matmul_peak(name, info["peak_size"]))

    # The peak is measured before the first case and after each one, and the best sample counts: load from other
    # processes during one measurement must not inflate every MFU, and a quiet moment anywhere in the run is found.
    measure_peaks()
    print(f"jax {jax.__version__} on {info['device_kind']}; {len(args.plan)} case(s), batch {args.batch}, "
          f"LLM seq {args.seq}, {args.dtype}, {args.repeats} timed steps each", flush=True)
    rows = []
    began = time.perf_counter()
    for family, size in args.plan:
        if args.budget is not None and time.perf_counter() - began > args.budget:
            rows.append({"family": family, "size": size, "skipped": f"over the {args.budget:g} s budget"})
            continue
        try:
            row = run_case(family, size, args)
            print(f"  {family} {size}: {row['step_ms']:,.1f} ms/step (compiled in {row['compile_s']:.1f} s), "
                  f"{row['tflops']:.4g} model TFLOP/s", flush=True)
        except Exception as error:  # one case (e.g. out of memory) must not lose the others  # noqa: BLE001
            row = {"family": family, "size": size, "error": f"{type(error).__name__}: {error}"}
            print(f"  {family} {size}: FAILED {row['error']}", flush=True)
        rows.append(row)
        measure_peaks()
    peaks = {name: max(values) for name, values in samples.items()}
    for row in rows:
        if "tflops" in row:
            row["mfu"] = row["tflops"] * 1e12 / peaks[args.dtype]
    info["load_after"] = _load()
    print(machine_line(info, peaks, args.dtype))
    print(markdown_table(rows))
    results = {"machine": info, "peaks_flops": peaks, "peak_samples_flops": samples, "dtype": args.dtype,
               "batch": args.batch, "seq": args.seq, "repeats": args.repeats, "rows": rows}
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=2)
            out.write("\n")
    return results


if __name__ == "__main__":
    main()
