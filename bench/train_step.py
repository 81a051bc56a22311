"""Tokens per second of one full training step (forward, backward, global-norm clipping, AdamW), float32.

Fixed shape: vocabulary 256, width 256, 4 layers, 4 heads (no GQA), MLP width 768, sequence 256, batch 16, untied
output projection. When PyTorch and `transformers` are installed, the same step of `transformers`'
LlamaForCausalLM at the identical shape runs in the same process afterwards, and the ratio is printed. Also printed:
the float32 matrix-multiply rate XLA reaches on this machine and the share of it each step achieves (model FLOPs
counted as 6 x matmul parameters + 12 x layers x sequence x width per token: dense attention, as both compute it).

    python bench/train_step.py [--steps 10] [--repeats 3]
"""

import argparse
import os
import platform
import statistics
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


def time_steps(run_step, steps: int, repeats: int) -> float:
    """Best-of-`repeats` mean seconds per step over `steps` steps (after the caller's warmup)."""
    timings = []
    for _ in range(repeats):
        began = time.perf_counter()
        for _ in range(steps):
            run_step()
        timings.append((time.perf_counter() - began) / steps)
    return min(timings)


def matmul_rate(size: int = 2048, repeats: int = 10) -> float:
    """float32 FLOP/s of an XLA [size, size] x [size, size] matrix multiply on the default device."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((size, size), np.float32))
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, a).block_until_ready()
    began = time.perf_counter()
    for _ in range(repeats):
        matmul(a, a).block_until_ready()
    return 2 * size**3 * repeats / (time.perf_counter() - began)


def attnx_seconds_per_step(steps: int, repeats: int) -> float:
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

    for _ in range(3):  # compile and warm up
        run_step()
    return time_steps(run_step, steps, repeats)


def torch_seconds_per_step(steps: int, repeats: int) -> float | None:
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

    for _ in range(3):
        run_step()
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}")
    return time_steps(run_step, steps, repeats)


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
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs; jax {jax.__version__} on "
          f"{jax.devices()[0].platform}; shape: vocab {VOCAB}, width {WIDTH}, {DEPTH} layers, {HEADS} heads, "
          f"MLP {MLP_WIDTH}, seq {SEQ_LEN}, batch {BATCH}, float32")
    # Other processes on the same cores slow both contenders; the load average says whether this run had them.
    print(f"load average before the run (1/5/15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    flops = model_flops_per_token()
    rate = matmul_rate()
    print(f"XLA float32 matmul (2048^3): {rate / 1e9:.1f} GFLOP/s; model: {flops / 1e6:.2f} MFLOP per token")

    attnx_seconds = attnx_seconds_per_step(args.steps, args.repeats)
    attnx_tokens = TOKENS_PER_STEP / attnx_seconds
    print(f"attnx (jax):           {attnx_tokens:9,.0f} tokens/s  ({attnx_seconds * 1e3:.0f} ms/step, "
          f"{attnx_tokens * flops / rate:.0%} of the matmul rate)")
    torch_seconds = torch_seconds_per_step(args.steps, args.repeats)
    if torch_seconds is None:
        print("transformers Llama:    skipped (pip install torch transformers to compare)")
        return
    torch_tokens = TOKENS_PER_STEP / torch_seconds
    print(f"transformers Llama:    {torch_tokens:9,.0f} tokens/s  ({torch_seconds * 1e3:.0f} ms/step, "
          f"{torch_tokens * flops / rate:.0%} of the matmul rate)")
    print(f"ratio attnx / transformers: {attnx_tokens / torch_tokens:.2f}x")
    print(f"load average after the run (1/5/15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
