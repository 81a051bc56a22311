"""The byte-level language-modelling task: next-byte cross-entropy, validation bits per byte against gzip/xz, and a
sampled continuation at the end. Plugs into `train.trainer.train` (see its docstring for the task interface).
"""

import dataclasses
import functools
import gzip
import lzma
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from models.layers.mixers import call_with_auxiliary_loss
from models.llm import LLM, LLMConfig
from models.sampling import sample_logits
from train.data.byte_lm import ByteLMData

LN2 = math.log(2.0)


@dataclasses.dataclass
class ByteLanguageModel:
    """Trains `model` (an LLMConfig with vocab 256) to predict the next byte of `data`.

    sample_prompt is continued by `sample_bytes` bytes at `sample_temperature` when training ends (0 = greedy).
    """

    model: LLMConfig = dataclasses.field(default_factory=LLMConfig)
    data: ByteLMData = dataclasses.field(default_factory=ByteLMData)
    eval_batch_size: int = 32
    sample_prompt: str = "def "
    sample_bytes: int = 200
    sample_temperature: float = 0.8

    def __post_init__(self):
        if self.model.vocab_size != 256:
            raise ValueError(f"a byte-level model needs LLMConfig.vocab_size=256, got {self.model.vocab_size}")
        if not self.sample_temperature >= 0:
            raise ValueError(f"sample_temperature must be >= 0, got {self.sample_temperature!r}")
        if not self.sample_prompt:
            raise ValueError("sample_prompt must not be empty: sampling continues it")

    # ---- Training ----

    @property
    def tokens_per_step(self) -> int:
        return self.data.batch_size * self.data.seq_len

    def build_model(self, rngs: nnx.Rngs) -> LLM:
        return LLM(self.model, rngs=rngs)

    def train_iterator(self, process_index: int, process_count: int):
        return self.data.train_iterator(process_index, process_count)

    @staticmethod
    def loss_fn(model: LLM, batch: dict[str, jax.Array], rng: jax.Array | None = None
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Mean next-byte cross-entropy in nats over `batch["tokens"]` [B, T + 1], plus any auxiliary loss the
        model sows (MoH's balance loss); deterministic: `rng` unused."""
        tokens = batch["tokens"].astype(jnp.int32)
        logits, auxiliary = call_with_auxiliary_loss(model, tokens[:, :-1])  # e.g. MoH's weighted balance loss
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
        metrics = {"bits_per_byte": loss / LN2}
        if auxiliary is not None:
            metrics["auxiliary_loss"] = auxiliary
            loss = loss + auxiliary
        return loss, metrics

    # ---- Evaluation ----

    @functools.cached_property
    def compression_baselines(self) -> dict[str, float]:
        """Bits per byte of gzip -9 and xz -9 (Python's gzip/lzma at their highest presets) on the validation bytes."""
        text = self.data.validation_text
        return {
            "gzip_bits_per_byte": 8 * len(gzip.compress(text, compresslevel=9)) / len(text),
            "xz_bits_per_byte": 8 * len(lzma.compress(text, preset=9)) / len(text),
        }

    @functools.cached_property
    def _validation_batches(self) -> list[tuple[np.ndarray, np.ndarray]]:
        windows, mask = self.data.validation_windows(), self.data.validation_target_mask()
        pad = -len(windows) % self.eval_batch_size  # whole batches: one compiled shape
        windows = np.concatenate([windows, np.zeros((pad, windows.shape[1]), windows.dtype)])
        mask = np.concatenate([mask, np.zeros((pad, mask.shape[1]), mask.dtype)])
        size = self.eval_batch_size
        return [(windows[i : i + size], mask[i : i + size]) for i in range(0, len(windows), size)]

    def evaluate(self, model: LLM) -> dict[str, float]:
        """Validation bits per byte (every validation byte but the first is predicted), with the baselines."""
        graphdef, state = nnx.split(model)
        total_nats = sum(float(_summed_nats(graphdef, state, w, m)) for w, m in self._validation_batches)
        predicted = sum(float(m.sum()) for _, m in self._validation_batches)
        return {"validation_bits_per_byte": total_nats / predicted / LN2, **self.compression_baselines}

    def describe_evaluation(self, step: int, results: dict[str, float]) -> str:
        return (f"step {step}: validation {results['validation_bits_per_byte']:.3f} bits/byte  |  "
                f"gzip -9 {results['gzip_bits_per_byte']:.3f}  xz -9 {results['xz_bits_per_byte']:.3f}  "
                f"(same {len(self.data.validation_text):,} validation bytes)")

    # ---- End of training ----

    def finish(self, model: LLM, rng: jax.Array, workdir: str | None = None) -> None:
        print(f"\nSample (temperature {self.sample_temperature}) continuing {self.sample_prompt!r}:\n")
        print(self.sample(model, rng))

    def sample(self, model: LLM, rng: jax.Array) -> str:
        """The prompt followed by `sample_bytes` sampled bytes, cut at the first file separator (NUL).

        Past `seq_len` bytes the model sees the most recent `seq_len` bytes, the context length it was trained on.
        """
        prompt = np.frombuffer(self.sample_prompt.encode(), np.uint8)
        length = len(prompt) + self.sample_bytes
        buffer = np.zeros(max(length, self.data.seq_len), np.int32)
        buffer[: len(prompt)] = prompt
        graphdef, state = nnx.split(model)
        out = np.asarray(_generate(graphdef, state, jnp.asarray(buffer), len(prompt), length, self.data.seq_len,
                                   self.sample_temperature, rng))
        generated = bytes(out[:length].astype(np.uint8).tolist()).split(b"\x00")[0]
        return generated.decode("utf-8", errors="replace")


@functools.partial(jax.jit, static_argnums=0)
def _summed_nats(graphdef, state, windows, target_mask):
    tokens = windows.astype(jnp.int32)
    logits = nnx.merge(graphdef, state)(tokens[:, :-1])
    nats = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    return jnp.sum(nats * target_mask)


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5, 6))
def _generate(graphdef, state, buffer, prompt_length, length, context, temperature, rng):
    """Fills buffer[prompt_length:length] one byte at a time, each from the `context` bytes before it.

    Without a KV cache each byte re-reads a whole window; causality makes the not-yet-written tail of the window
    irrelevant, and at these sizes the loop takes about a second.
    """
    model = nnx.merge(graphdef, state)

    def next_byte(position, carry):
        buffer, rng = carry
        start = jnp.clip(position - context, 0, buffer.shape[0] - context)
        window = jax.lax.dynamic_slice(buffer, (start,), (context,))
        logits = model(window[None])[0, position - 1 - start]
        rng, draw = jax.random.split(rng)
        token = sample_logits(logits[None], draw, temperature=temperature)[0]
        return buffer.at[position].set(token.astype(buffer.dtype)), rng

    buffer, _ = jax.lax.fori_loop(prompt_length, length, next_byte, (buffer, rng))
    return buffer
