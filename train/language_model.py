"""The byte-level language-modelling task: next-byte cross-entropy, validation bits per byte against gzip/xz, and a
sampled continuation at the end. Plugs into `train.trainer.train` (see its docstring for the task interface).
"""

import dataclasses
import functools
import gzip
import inspect
import lzma
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import attnx
from models.layers.mixers import call_with_auxiliary_loss
from models.llm import LLM, MIXERS, LLMConfig
from models.sampling import sample_logits
from train.data.byte_lm import ByteLMData
from train.data.landmark import IGNORE_LABEL, insert_landmarks, language_model_example, num_ordinary

LN2 = math.log(2.0)
LANDMARK_ID = 256  # Landmark Attention's extra token after the 256 byte values (vocab 257)


@dataclasses.dataclass
class ByteLanguageModel:
    """Trains `model` (an LLMConfig with vocab 256) to predict the next byte of `data`.

    sample_prompt is continued by `sample_bytes` bytes at `sample_temperature` when training ends (0 = greedy).
    With attention 'landmark' (Landmark Attention, arXiv 2305.16300 §3.1) every input carries the landmark token
    256 after each `block_size` bytes (vocab 257): train/data/landmark.py lays windows out, landmark slots are left
    out of the loss, and bits per byte count bytes only.
    """

    model: LLMConfig = dataclasses.field(default_factory=LLMConfig)
    data: ByteLMData = dataclasses.field(default_factory=ByteLMData)
    eval_batch_size: int = 32
    sample_prompt: str = "def "
    sample_bytes: int = 200
    sample_temperature: float = 0.8

    def __post_init__(self):
        if self.landmark_block_size is not None:
            if self.model.vocab_size != LANDMARK_ID + 1:
                raise ValueError(f"a byte-level model with landmark attention needs LLMConfig.vocab_size=257 (the "
                                 f"256 bytes and the landmark token), got {self.model.vocab_size}")
        elif self.model.vocab_size != 256:
            raise ValueError(f"a byte-level model needs LLMConfig.vocab_size=256, got {self.model.vocab_size}")
        if not self.sample_temperature >= 0:
            raise ValueError(f"sample_temperature must be >= 0, got {self.sample_temperature!r}")
        if not self.sample_prompt:
            raise ValueError("sample_prompt must not be empty: sampling continues it")

    @property
    def landmark_block_size(self) -> int | None:
        """Bytes per landmark block when any layer uses landmark attention (one block size for all), else None."""
        sizes = set()
        for layer in range(self.model.depth):
            kind, kwargs = self.model.layer_mixer(layer)
            if kind in MIXERS:  # the LLM's own mixers (tnl, base_conv) are not registry entries
                continue
            spec = attnx.get_attention(kind)
            if spec.name == "landmark":
                default = inspect.signature(spec.fn).parameters["block_size"].default
                sizes.add(int(kwargs.get("block_size", default)))
        if len(sizes) > 1:
            raise ValueError(f"landmark layers with different block sizes {sorted(sizes)}: the byte LM lays its "
                             f"inputs out once, so every landmark layer needs the same block_size")
        return sizes.pop() if sizes else None

    # ---- Training ----

    @property
    def tokens_per_step(self) -> int:
        return self.data.batch_size * self.data.seq_len

    def build_model(self, rngs: nnx.Rngs) -> LLM:
        return LLM(self.model, rngs=rngs)

    def train_iterator(self, process_index: int, process_count: int):
        return self.data.train_iterator(process_index, process_count)

    def loss_fn(self, model: LLM, batch: dict[str, jax.Array], rng: jax.Array | None = None
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Mean next-byte cross-entropy in nats over `batch["tokens"]` [B, T + 1], plus any auxiliary loss the
        model sows (MoH's balance loss); deterministic: `rng` unused."""
        inputs, labels = _layout(batch["tokens"].astype(jnp.int32), self.landmark_block_size)
        logits, auxiliary = call_with_auxiliary_loss(model, inputs)  # e.g. MoH's weighted balance loss
        scored = labels != IGNORE_LABEL
        nats = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(scored, labels, 0))
        loss = jnp.sum(nats * scored) / jnp.sum(scored)
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
        sums = [_summed_nats(graphdef, state, w, m, self.landmark_block_size) for w, m in self._validation_batches]
        total_nats, predicted = (sum(float(pair[i]) for pair in sums) for i in (0, 1))
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
                                   self.sample_temperature, rng, self.landmark_block_size))
        generated = bytes(out[:length].astype(np.uint8).tolist()).split(b"\x00")[0]
        return generated.decode("utf-8", errors="replace")


def _layout(windows: jax.Array, block_size: int | None) -> tuple[jax.Array, jax.Array]:
    """Byte windows [B, T + 1] -> (inputs [B, T], labels [B, T]): the plain shift, or with a landmark token after
    every `block_size` bytes (labels IGNORE_LABEL there; the inputs then cover fewer than T bytes)."""
    if block_size is None:
        return windows[:, :-1], windows[:, 1:]
    inputs, labels = language_model_example(windows, block_size=block_size, landmark_id=LANDMARK_ID,
                                            length=windows.shape[1] - 1)
    return inputs.astype(jnp.int32), labels


@functools.partial(jax.jit, static_argnums=(0, 4))
def _summed_nats(graphdef, state, windows, target_mask, block_size=None):
    """(summed nats, predicted bytes) over the bytes `target_mask` [B, T] marks (landmark slots never count)."""
    inputs, labels = _layout(windows.astype(jnp.int32), block_size)
    if block_size is not None:  # the mask follows its byte through the layout; 0 at the landmark slots
        _, laid_out = insert_landmarks(windows[:, :-1], target_mask.astype(jnp.int32), block_size=block_size,
                                       landmark_id=LANDMARK_ID, ignore_label=0, length=inputs.shape[1])
        target_mask = laid_out.astype(jnp.float32)
    logits = nnx.merge(graphdef, state)(inputs)
    nats = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(labels == IGNORE_LABEL, 0, labels))
    return jnp.sum(nats * target_mask), jnp.sum(target_mask)


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5, 6, 8))
def _generate(graphdef, state, buffer, prompt_length, length, context, temperature, rng, block_size=None):
    """Fills buffer[prompt_length:length] one byte at a time, each from the `context` bytes before it.

    Without a KV cache each byte re-reads a whole window; causality makes the not-yet-written tail of the window
    irrelevant, and at these sizes the loop takes about a second. With landmarks, the window holds the bytes that fit
    in `context` slots beside their landmark tokens.
    """
    model = nnx.merge(graphdef, state)
    raw_context = context if block_size is None else num_ordinary(context, block_size)

    def next_byte(position, carry):
        buffer, rng = carry
        start = jnp.clip(position - raw_context, 0, buffer.shape[0] - raw_context)
        window = jax.lax.dynamic_slice(buffer, (start,), (raw_context,))
        last = position - 1 - start  # the window index of the byte that predicts `position`
        if block_size is not None:
            window, _ = insert_landmarks(window, block_size=block_size, landmark_id=LANDMARK_ID)
            last = last + last // block_size  # its slot once landmarks sit after each block
        logits = model(window[None])[0, last]
        rng, draw = jax.random.split(rng)
        token = sample_logits(logits[None], draw, temperature=temperature)[0]
        return buffer.at[position].set(token.astype(buffer.dtype)), rng

    buffer, _ = jax.lax.fori_loop(prompt_length, length, next_byte, (buffer, rng))
    return buffer
