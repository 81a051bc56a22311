"""The soft router W_A of a BAM attention layer (Zhang et al., 2024, arXiv 2408.08274, §4): per-token expert
weights r = softmax(W_A x) over E attention experts (attnx.ops.experts.bam mixes the experts' heads with them);
and the block's top-k FFN experts (`ExpertSwiGLU`, attnx.ops.experts.ffn)."""

from typing import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from attnx.ops.experts.bam import check_experts
from attnx.ops.experts.ffn import expert_ffn, top_k_routing


class MoAExpertsRouter(nnx.Module):
    """{"gates": [B, T, E]} from the layer input x [B, T, D]. BAM initialises routers randomly (Figure 1); here a
    bias-free linear with Xavier-uniform weights, as MoH's routers."""

    def __init__(self, width: int, num_heads: int, *, num_kv_heads: int, num_experts: int = 2,
                 kv_shared: bool = False, rngs: nnx.Rngs, param_dtype=jnp.float32, **options):
        del options  # the layer's head sizes and the core mechanism's options, used by the attention function
        check_experts(num_heads, num_kv_heads, num_experts, kv_shared)
        init = nnx.initializers.xavier_uniform()
        self.router_de = nnx.Param(init(rngs.params(), (width, num_experts), param_dtype))

    def __call__(self, x: jax.Array, query: jax.Array, key: jax.Array | None = None) -> dict[str, jax.Array]:
        logits = x.astype(jnp.float32) @ self.router_de[...].astype(jnp.float32)
        return {"gates": jax.nn.softmax(logits, axis=-1)}


class ExpertSwiGLU(nnx.Module):
    """BAM's top-k FFN experts (attnx.ops.experts.ffn): E SwiGLU experts, each shaped and initialised as the LLM's
    dense `SwiGLU` (so dense FFNs can be copied in: upcycling), a router W_F (random, as BAM's; Xavier-uniform as
    the attention router) and the Switch balance loss, sown weighted by balance_weight under
    `call_with_auxiliary_loss` as MoH's is. Built by the LLM for `LLMConfig.ffn_experts`."""

    def __init__(self, width: int, mlp_width: int, *, num_experts: int, top_k: int = 2,
                 balance_weight: float = 0.01, rngs: nnx.Rngs, param_dtype=jnp.float32):
        check_ffn_experts({"num_experts": num_experts, "top_k": top_k, "balance_weight": balance_weight})
        self.top_k, self.balance_weight = top_k, float(balance_weight)
        init = nnx.initializers.xavier_uniform()
        self.router_de = nnx.Param(init(rngs.params(), (width, num_experts), param_dtype))
        # The dense SwiGLU's fan-in initialisers, with the expert axis as a batch axis.
        gate_up = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=1, out_axis=(2, 3),
                                                    batch_axis=0)
        down = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=1, out_axis=2,
                                                 batch_axis=0)
        self.gate_up_ed2f = nnx.Param(gate_up(rngs.params(), (num_experts, width, 2, mlp_width), param_dtype))
        self.down_efd = nnx.Param(down(rngs.params(), (num_experts, mlp_width, width), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        logits = x.astype(jnp.float32) @ self.router_de[...].astype(jnp.float32)
        gates, balance = top_k_routing(logits, self.top_k)
        # Recorded only under nnx.capture (the loss function's `call_with_auxiliary_loss`); inference skips it.
        if hasattr(self, "__captures__"):
            self.sow(nnx.Intermediate, "auxiliary_loss", self.balance_weight * balance,
                     reduce_fn=lambda _, new: new, init_fn=lambda: jnp.zeros((), jnp.float32))
        return expert_ffn(x, self.gate_up_ed2f[...], self.down_efd[...], gates)


def check_ffn_experts(options) -> None:
    """LLMConfig.ffn_experts: {} (dense FFN) or {'num_experts': E >= 1, 'top_k': 1..E (default 2),
    'balance_weight': >= 0 (default 0.01)}."""
    if not isinstance(options, Mapping):
        raise ValueError(f"ffn_experts: expected a dict ({{}}: the dense FFN), got {options!r}")
    unknown = set(options) - {"num_experts", "top_k", "balance_weight"}
    if unknown:
        raise ValueError(f"ffn_experts: unknown keys {sorted(unknown)}; allowed: num_experts, top_k, balance_weight")
    if not options:
        return
    experts, top_k = options.get("num_experts"), options.get("top_k", 2)
    if not isinstance(experts, int) or isinstance(experts, bool) or experts < 1:
        raise ValueError(f"ffn_experts.num_experts: expected an int >= 1, got {experts!r}")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= experts:
        raise ValueError(f"ffn_experts.top_k: expected an int in [1, num_experts={experts}], got {top_k!r}")
    weight = options.get("balance_weight", 0.01)
    if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight < 0:
        raise ValueError(f"ffn_experts.balance_weight: expected a number >= 0, got {weight!r}")


def upcycle(seeds, config, *, rngs: nnx.Rngs):
    """BAM's upcycling (arXiv 2408.08274, §3; Figure 1): an `LLM` of `config` (attention 'moa_experts' with E
    experts, ffn_experts with E experts) initialised from E dense seed LLMs of the per-expert shape. Expert e's
    query/output heads (and, with full experts, key/value heads) are seed e's, in the expert-major head order of
    attnx.ops.experts.bam; FFN expert e is seed e's SwiGLU; the routers keep their random initialisation; every
    other weight (embeddings, norms, KV-shared keys/values) is the seeds' mean. E copies of one seed therefore give
    that seed's function (tested). The seeds are not trained here (BAM continues pretraining each on its domain)."""
    from models.llm import LLM  # models.llm imports this module

    kwargs = dict(config.attention_kwargs)
    num_experts = len(seeds)
    if config.attention != "moa_experts" or kwargs.get("num_experts", 2) != num_experts:
        raise ValueError(f"upcycle: config.attention must be 'moa_experts' with num_experts={num_experts} (one "
                         f"expert per seed), got {config.attention!r} with {kwargs}")
    if dict(config.ffn_experts).get("num_experts") != num_experts:
        raise ValueError(f"upcycle: config.ffn_experts must have num_experts={num_experts} (one FFN expert per "
                         f"seed), got {dict(config.ffn_experts)}")
    kv_shared = kwargs.get("kv_shared", False)
    model = LLM(config, rngs=rngs)
    seed_states = [{path: v[...] for path, v in nnx.to_flat_state(nnx.state(seed, nnx.Param))} for seed in seeds]
    stack = lambda path: jnp.stack([state[path] for state in seed_states])
    new = {}
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = path[-1]
        if name == "router_de":
            continue
        if name in ("gate_up_ed2f", "down_efd"):
            value = stack((*path[:-1], {"gate_up_ed2f": "gate_up_d2f", "down_efd": "down_fd"}[name]))
        elif name in ("query_dnh", "out_nhd") or (name in ("key_dkh", "value_dkh") and not kv_shared):
            axis = 0 if name == "out_nhd" else 1  # the head axis; experts concatenated expert-major
            value = jnp.concatenate(list(stack(path)), axis=axis)
        else:
            value = jnp.mean(stack(path), axis=0)
        if value.shape != variable[...].shape:
            raise ValueError(f"upcycle: {'/'.join(map(str, path))} from the seeds has shape {value.shape}, the MoE "
                             f"model needs {variable[...].shape}: seeds must have the per-expert head counts")
        new[path] = value.astype(variable[...].dtype)
    params = nnx.state(model, nnx.Param)
    for path, value in new.items():
        node = params
        for part in path:
            node = node[part]
        node.set_value(value)
    nnx.update(model, params)
    return model
