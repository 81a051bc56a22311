"""Tokens per second of one full training step (forward, backward, global-norm clipping, AdamW), float32.

Fixed shape: vocabulary 256, width 256, 4 layers, 4 heads (no GQA), MLP width 768, sequence 256, batch 16, untied
output projection. When PyTorch and `transformers` are installed, the same step of `transformers`'
LlamaForCausalLM at the identical shape (same optimizer, clipping and loss) runs in the same process, in rounds
interleaved with ours, and the ratio is printed. Also printed: the float32 matrix-multiply rate XLA reaches on this
machine and the share of it each step achieves (model FLOPs counted as 6 x matmul parameters + 12 x layers x
sequence x width per token: dense attention, as both compute it).

Timings are the best round of each contender. On a shared machine PyTorch's OpenMP threads suffer far more from
other load than XLA's thread pool, so compare runs whose printed load average is near zero.

    python bench/train_step.py [--steps 5] [--repeats 3]
"""

import argparse
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.llm import LLM, llm_config
from train.optim import OptimizerConfig, make_optimizer
from train.step import init_train_state, make_train_step
from train.language_model import ByteLanguageModel

VOCAB, WIDTH, DEPTH, HEADS, MLP_WIDTH, SEQ_LEN, BATCH = 256, 256, 4, 4, 768, 256, 16
TOKENS_PER_STEP = SEQ_LEN * BATCH


def model_flops_per_token() -> float:
    matmul_params = DEPTH * (4 * WIDTH * WIDTH + 3 * WIDTH * MLP_WIDTH) + WIDTH * VOCAB  # + output projection
    return 6 * matmul_params + 12 * DEPTH * SEQ_LEN * WIDTH


def mean_seconds(run, count: int) -> float:
    began = time.perf_counter()
    for _ in range(count):
        run()
    return (time.perf_counter() - began) / count


def build_matmul(size: int = 2048):
    """An XLA float32 [size, size] x [size, size] matrix multiply as a blocking callable, and its FLOPs."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((size, size), np.float32))
    matmul = jax.jit(lambda x, y: x @ y)
    return (lambda: matmul(a, a).block_until_ready()), 2 * size**3


def build_attnx_step():
    """One attnx train step as a no-argument callable that blocks until the step is done."""
    config = llm_config("bench")
    model = LLM(config, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    tx = make_optimizer(OptimizerConfig(warmup_steps=10), total_steps=1000)
    step_fn = make_train_step(lambda p: nnx.merge(graphdef, p), ByteLanguageModel.loss_fn, tx, skip_nonfinite=False)
    batch = {"tokens": jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (BATCH, SEQ_LEN + 1), np.uint8))}
    state = {"value": init_train_state(params, tx, seed=0)}

    def run_step():
        state["value"], metrics = step_fn(state["value"], batch)
        metrics["loss"].block_until_ready()

    return run_step


def build_torch_step():
    """The same step of transformers' LlamaForCausalLM, or None when torch/transformers are not installed."""
    try:
        import torch
        import transformers
    except ImportError:
        return None
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=MLP_WIDTH, num_hidden_layers=DEPTH,
        num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=SEQ_LEN, rms_norm_eps=1e-6,
        tie_word_embeddings=False, attn_implementation="sdpa", torch_dtype=torch.float32)
    model = transformers.LlamaForCausalLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ_LEN + 1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def run_step():
        optimizer.zero_grad(set_to_none=True)
        logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        loss.item()

    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}")
    return run_step


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="steps per timing")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; the best round of each contender counts")
    args = parser.parse_args()
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs; jax {jax.__version__} on {jax.devices()[0].platform}; "
          f"shape: vocab {VOCAB}, width {WIDTH}, {DEPTH} layers, {HEADS} heads, MLP {MLP_WIDTH}, seq {SEQ_LEN}, "
          f"batch {BATCH}, float32")
    # Other processes on the same cores slow every contender; the load average says whether this run had them.
    print(f"load average before the run (1/5/15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    contenders = {"attnx (jax)": build_attnx_step()}
    torch_step = build_torch_step()
    if torch_step is not None:
        contenders["transformers Llama"] = torch_step
    matmul, matmul_flops = build_matmul()
    for run in [*contenders.values(), matmul]:
        for _ in range(3):  # compile and warm up
            run()
    # Rounds interleave the contenders, so a burst of load from elsewhere hits all of them alike; best round wins.
    best = {name: float("inf") for name in [*contenders, "matmul"]}
    for _ in range(args.repeats):
        for name, run in contenders.items():
            best[name] = min(best[name], mean_seconds(run, args.steps))
        best["matmul"] = min(best["matmul"], mean_seconds(matmul, 5))
    rate = matmul_flops / best["matmul"]
    flops = model_flops_per_token()
    print(f"XLA float32 matmul (2048^3): {rate / 1e9:.1f} GFLOP/s; model: {flops / 1e6:.2f} MFLOP per token")
    tokens = {}
    for name in contenders:
        tokens[name] = TOKENS_PER_STEP / best[name]
        print(f"{name + ':':22s}{tokens[name]:9,.0f} tokens/s  ({best[name] * 1e3:.0f} ms/step, "
              f"{tokens[name] * flops / rate:.0%} of the matmul rate)")
    if torch_step is None:
        print("transformers Llama:    skipped (pip install torch transformers to compare)")
    else:
        print(f"ratio attnx / transformers: {tokens['attnx (jax)'] / tokens['transformers Llama']:.2f}x")
    print(f"load average after the run (1/5/15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
