"""AdamW with linear warmup, cosine decay and global-norm gradient clipping, configured from gin."""

import dataclasses

import jax
import optax


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Hyper-parameters of `make_optimizer`. The schedule's length is the run's total number of steps.

    The learning rate rises linearly from 0 to `peak_learning_rate` over `warmup_steps`, then follows a cosine down to
    `peak_learning_rate * final_learning_rate_fraction` at the last step. Weight decay skips vectors (norm scales),
    which is the usual practice: decaying a gain towards zero only fights the normalisation.
    """

    peak_learning_rate: float = 3e-3
    warmup_steps: int = 100
    final_learning_rate_fraction: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_global_norm: float | None = 1.0

    def __post_init__(self):
        if not self.peak_learning_rate > 0:
            raise ValueError(f"OptimizerConfig.peak_learning_rate must be > 0, got {self.peak_learning_rate!r}")
        if not (isinstance(self.warmup_steps, int) and self.warmup_steps >= 0):
            raise ValueError(f"OptimizerConfig.warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        if not 0 <= self.final_learning_rate_fraction <= 1:
            raise ValueError(
                f"OptimizerConfig.final_learning_rate_fraction must be in [0, 1], got "
                f"{self.final_learning_rate_fraction!r}")
        if self.clip_global_norm is not None and not self.clip_global_norm > 0:
            raise ValueError(f"OptimizerConfig.clip_global_norm must be > 0 or None, got {self.clip_global_norm!r}")


def learning_rate_schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Warmup + cosine over `total_steps`; warmup is shortened to fit very short runs (e.g. tests of a few steps)."""
    warmup = min(config.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.peak_learning_rate,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=config.peak_learning_rate * config.final_learning_rate_fraction,
    )


def make_optimizer(config: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """clip_by_global_norm (if set) followed by AdamW on the schedule above."""
    adamw = optax.adamw(
        learning_rate_schedule(config, total_steps),
        b1=config.beta1,
        b2=config.beta2,
        eps=config.eps,
        weight_decay=config.weight_decay,
        mask=_decay_mask,
    )
    if config.clip_global_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(config.clip_global_norm), adamw)


def _decay_mask(params):
    """True for matrices (decayed), False for vectors such as norm gains."""
    return jax.tree.map(lambda p: p.ndim > 1, params)
