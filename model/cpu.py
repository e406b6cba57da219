"""What this CPU can do for training, and the allocator setting a training step wants: probes, not training."""

from __future__ import annotations

import ctypes
import functools

import torch
from torch import nn

PRECISIONS = ("auto", "fp32", "bf16", "bf16-all")


@functools.cache
def bf16_native() -> bool:
    """Whether oneDNN computes bfloat16 with this CPU's own instructions (AVX-512 and newer).

    Without them (AVX2 alone) bfloat16 autocast still runs, emulated and far slower than fp32: the
    quality bench's reference shape trains at 205 tokens/s with a bf16 decoder against 4,587 in fp32.
    """
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check()) if check is not None else False


@functools.cache
def bf16_recurrence_supported() -> bool:
    """Whether torch's fused LSTM runs under bfloat16 autocast here: oneDNN refuses it on some x86 CPUs."""
    lstm = nn.LSTM(4, 4)
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            lstm(torch.zeros(2, 1, 4))
    except RuntimeError:
        return False
    return True


def resolve_precision(precision: str) -> tuple[str, str | None]:
    """The precision a run asking for `precision` trains at here, and why it differs (None when it does not).

    "auto" is the fastest this CPU computes: bf16-all (recurrence and decoder) with native bfloat16 and a
    bfloat16 LSTM kernel, bf16 (the decoder alone) without that kernel, fp32 where bfloat16 is emulated.
    An explicit precision is kept, and refused only where it cannot run at all.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        if not bf16_native():
            return "fp32", "auto -> fp32: this CPU has no native bfloat16"
        if not bf16_recurrence_supported():
            return "bf16", "auto -> bf16: no bfloat16 LSTM kernel on this CPU"
        return "bf16-all", None
    if precision == "bf16-all" and not bf16_recurrence_supported():
        raise ValueError(
            "precision 'bf16-all' needs a bfloat16 LSTM kernel, which oneDNN does not build for this CPU; "
            "use 'bf16' (the decoder alone), 'fp32' or 'auto'"
        )
    return precision, None


def keep_freed_memory() -> None:
    """Make glibc keep freed memory for reuse instead of handing big blocks back to the OS each step.

    A step allocates tensors of batch·bptt·V floats (36 MB for WikiText-2), above glibc's mmap
    threshold: each is a fresh mapping whose pages fault in again, a quarter of a CPU step.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, 1 << 30)
