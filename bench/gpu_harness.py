"""Timing, FLOP counting, time budget and table printing for `bench/gpu_bench.py` (issue 7, deliverable 8).

FLOP convention (FlashAttention: Dao 2023, arXiv 2307.08691, §4.1; the same in FlashAttention-3, arXiv 2407.08608,
§4.1, and in jax's `attention_mgpu.main`): a forward pass costs 4·B·N·T·S·H (two matmuls, QKᵀ and PV, of
2·T·S·H each per head), halved when causal; forward+backward costs 3.5 × forward (the backward has five such
matmuls, 2.5 × forward). Neighbourhood attention counts only the keys each query sees: 4·B·N·T·M·H for M keys.

Timing: every case is compiled once (compile time recorded), run once to warm up, then timed as the median of
`repeats` samples; one sample is `inner` back-to-back calls followed by one `jax.block_until_ready`, divided by
`inner`, where `inner` is chosen so that a sample lasts at least `min_sample_s`. Queuing calls without a host sync
in between hides the Python dispatch cost (tens of microseconds), which is not negligible next to a 0.3 ms kernel.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Callable

import jax

# Order of the sections and their cumulative share of the time budget: a section may run until
# start + budget * (its share + the shares before it), so time a section leaves unused flows to the next ones.
SECTION_SHARES = (("softmax", 0.55), ("block_sparse", 0.15), ("linear", 0.15), ("neighborhood", 0.15))


class NotAvailable(Exception):
    """A kernel or package that this machine does not have; the case is reported as "not available"."""


def attention_flops(B: int, T: int, S: int, N: int, H: int, causal: bool, mode: str) -> float:
    """FLOPs of one call in the FlashAttention convention (module docstring); mode is "fwd" or "fwd+bwd"."""
    if mode not in ("fwd", "fwd+bwd"):
        raise ValueError(f"attention_flops.mode: {mode!r}; allowed: 'fwd', 'fwd+bwd'")
    forward = 4.0 * B * N * T * S * H * (0.5 if causal else 1.0)
    return forward * 3.5 if mode == "fwd+bwd" else forward


class Budget:
    """Wall-clock budget shared by the sections (SECTION_SHARES); cases past a section's deadline are skipped."""

    def __init__(self, seconds: float):
        self.start = time.perf_counter()
        self.seconds = float(seconds)
        self.deadline = self.start + self.seconds
        self.skipped = 0

    def open(self, section: str) -> None:
        total = 0.0
        for name, share in SECTION_SHARES:
            total += share
            if name == section:
                self.deadline = self.start + self.seconds * total
                return
        raise ValueError(f"Budget.open: unknown section {section!r}; known: {[n for n, _ in SECTION_SHARES]}")

    def exhausted(self) -> bool:
        return time.perf_counter() >= self.deadline

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def time_call(fn: Callable, args: tuple, *, repeats: int, min_sample_s: float) -> list[float]:
    """Per-call seconds of `repeats` samples (module docstring); `fn` is already compiled and warmed up."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    once = max(time.perf_counter() - t0, 1e-7)
    inner = max(1, min(200, math.ceil(min_sample_s / once)))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / inner)
        del out
    return samples


@dataclasses.dataclass
class Runner:
    """Compiles, checks memory, times and records one case at a time; never raises for a failing kernel."""

    budget: Budget
    repeats: int
    min_sample_s: float
    memory_limit_bytes: float
    matmul_flops_per_s: float | None = None
    rows: list = dataclasses.field(default_factory=list)
    _said: set = dataclasses.field(default_factory=set)

    def say_once(self, key, text: str) -> None:
        if key not in self._said:
            self._said.add(key)
            print(text, flush=True)

    def case(self, info: dict, fn: Callable | None, args: tuple, *, flops: float | None = None,
             tokens: int | None = None, error: Exception | None = None):
        """Run one case; returns (row, compiled function or None). `info` names it (section, impl, shape, mode);
        `error` records a kernel that could not even be built (NotAvailable / NotImplementedError)."""
        row = dict(info, status="ok")
        if flops is not None:
            row["flops"] = flops
        self.rows.append(row)
        label = " ".join(f"{k}={v}" for k, v in info.items() if k not in ("section", "dtype"))
        if error is None and self.budget.exhausted():
            row.update(status="skipped", reason="time budget")
            self.budget.skipped += 1
            self.say_once(("budget", info["section"]), f"[{info['section']}] time budget reached: skipping the "
                                                        f"remaining cases of this section")
            return row, None
        compiled = None
        try:
            if error is not None:
                raise error
            t0 = time.perf_counter()
            compiled = jax.jit(fn).lower(*args).compile()
            row["compile_s"] = round(time.perf_counter() - t0, 3)
            mem = compiled.memory_analysis()
            if mem is not None:
                row["compiled_bytes"] = int(mem.temp_size_in_bytes + mem.argument_size_in_bytes
                                            + mem.output_size_in_bytes)
                if row["compiled_bytes"] > self.memory_limit_bytes:
                    row.update(status="skipped", reason=f"needs {row['compiled_bytes'] / 2 ** 30:.1f} GiB > "
                                                        f"{self.memory_limit_bytes / 2 ** 30:.1f} GiB limit")
                    print(f"[{info['section']}] {label}: skipped, {row['reason']}", flush=True)
                    return row, None
            samples = time_call(compiled, args, repeats=self.repeats, min_sample_s=self.min_sample_s)
        except (NotAvailable, NotImplementedError, ImportError) as err:
            reason = _first_line(err)
            row.update(status="not available", reason=reason)
            self.say_once((info["section"], info.get("impl"), reason),
                          f"[{info['section']}] not available: {info.get('impl')}: {reason}")
            return row, None
        except Exception as err:  # a kernel that fails to lower or runs out of memory must not stop the run
            row.update(status="failed", reason=f"{type(err).__name__}: {_first_line(err)}")
            print(f"[{info['section']}] {label}: FAILED {row['reason']}", flush=True)
            return row, None
        seconds = statistics.median(samples)
        row.update(seconds=seconds, samples=len(samples))
        text = f"{seconds * 1e3:9.3f} ms"
        if flops is not None:
            row["tflops"] = flops / seconds / 1e12
            text += f"  {row['tflops']:8.4g} TFLOP/s"
            if self.matmul_flops_per_s:
                row["frac_matmul"] = flops / seconds / self.matmul_flops_per_s
                text += f" ({100 * row['frac_matmul']:.0f}% of matmul)"
        if tokens is not None:
            row["tokens_per_s"] = tokens / seconds
            text += f"  {row['tokens_per_s'] / 1e6:8.3f} Mtok/s"
        print(f"[{info['section']}] {label}: {text}  (compile {row['compile_s']:.1f} s)", flush=True)
        return row, compiled


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:300]


def cell(row: dict | None, key: str, fmt: str) -> str:
    """A table cell: the formatted value, or why there is none."""
    if row is None:
        return "-"
    if row["status"] != "ok":
        return {"not available": "n/a", "skipped": "skip", "failed": "FAIL"}[row["status"]]
    return fmt.format(row[key])


def markdown_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)
