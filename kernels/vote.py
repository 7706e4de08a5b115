"""Argmax voting: logits (B, K) + the image slot of each row -> int64 vote counts (M, K).

counts[slots[b], argmax(logits[b])] += 1 for every row whose K logits are all finite, with ties
going to the lowest index (as torch.argmax); rows with any NaN or +-inf logit add one to
``nonfinite`` and never vote (DESIGN §5: a non-finite output is an error, not a vote for a class).
Logits may be float32, bfloat16 or float16 (compared in float32, which is exact).
"""

from __future__ import annotations

import torch

from .jit import jit, tl
from .perturb import _next_pow2, check_device


@jit
def _vote_kernel(
    logits_ptr,         # (B, K) logits, float32 / bfloat16 / float16, any strides
    slots_ptr,          # (B,) int64: the packed image of each row
    counts_ptr,         # (M, K) int64 vote counts, accumulated into
    nonfinite_ptr,      # (1,) int64: rows with a NaN or infinite logit, accumulated into
    B, K,               # rows, classes
    stride_b, stride_k,     # element strides of the logits
    stride_cm, stride_ck,   # element strides of the counts
    ROWS: tl.constexpr,     # rows per program
    BK: tl.constexpr,       # classes per block of the running argmax
):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    rmask = rows < B
    row_off = rows.to(tl.int64) * stride_b
    best = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    best_idx = tl.zeros([ROWS], dtype=tl.int32)
    bad = tl.zeros([ROWS], dtype=tl.int32)
    for k_start in range(0, K, BK):
        cols = k_start + tl.arange(0, BK)
        m2 = rmask[:, None] & (cols < K)[None, :]
        v = tl.load(logits_ptr + row_off[:, None] + cols[None, :].to(tl.int64) * stride_k, mask=m2,
                    other=float("-inf")).to(tl.float32)
        nonfin = m2 & ((v != v) | (tl.abs(v) == float("inf")))
        bad += tl.sum(nonfin.to(tl.int32), axis=1)
        m = tl.max(v, axis=1)
        idx = tl.min(tl.where(v == m[:, None], cols[None, :], 2147483647), axis=1)
        better = m > best                       # strict: an earlier block keeps a tie
        best_idx = tl.where(better, idx, best_idx)
        best = tl.where(better, m, best)
    ok = rmask & (bad == 0)
    slot = tl.load(slots_ptr + rows, mask=rmask, other=0)
    target = counts_ptr + slot * stride_cm + best_idx.to(tl.int64) * stride_ck
    tl.atomic_add(target, tl.full([ROWS], 1, dtype=tl.int64), mask=ok)
    nbad = tl.sum((rmask & (bad > 0)).to(tl.int64), axis=0)
    tl.atomic_add(nonfinite_ptr, nbad, mask=nbad > 0)


def vote(logits: torch.Tensor, slots: torch.Tensor, counts: torch.Tensor, nonfinite: torch.Tensor) -> None:
    """Accumulate the votes of ``logits`` (B, K) into ``counts`` (M, K) int64 at rows ``slots`` (B,)
    int64, and the number of rows with non-finite logits into ``nonfinite`` (1,) int64. In place,
    no host synchronisation."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be (B, K), got shape {tuple(logits.shape)}")
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        logits = logits.float()
    B, K = logits.shape
    if counts.dtype != torch.int64 or counts.dim() != 2 or counts.shape[1] != K:
        raise ValueError(f"counts must be int64 (M, {K}), got {counts.dtype} {tuple(counts.shape)}")
    if nonfinite.dtype != torch.int64 or nonfinite.numel() < 1:
        raise ValueError("nonfinite must be an int64 tensor with one element")
    if slots.shape != (B,):
        raise ValueError(f"slots must have shape ({B},), got {tuple(slots.shape)}")
    if B == 0:
        return
    check_device(logits)
    slots = slots.to(device=logits.device, dtype=torch.int64).contiguous()
    ROWS, BK, warps = launch_config(B, K, logits.device.type)
    grid = (-(-B // ROWS),)
    _vote_kernel[grid](logits, slots, counts, nonfinite, B, K, logits.stride(0), logits.stride(1),
                       counts.stride(0), counts.stride(1), ROWS=ROWS, BK=BK, num_warps=warps)


def launch_config(rows: int, classes: int, device_type: str) -> tuple[int, int, int]:
    """(ROWS, BK, num_warps) of the vote kernel for ``rows`` rows of ``classes`` logits: blocks of BK
    classes, at most 2048 elements per program on a GPU (larger blocks in the interpreter)."""
    BK = min(_next_pow2(classes), 2048 if device_type == "cuda" else 4096)
    ROWS = max(1, min(_next_pow2(rows), (2048 if device_type == "cuda" else 16384) // BK))
    return ROWS, BK, 4 if ROWS * BK <= 1024 else 8


def vote_reference(logits: torch.Tensor, slots: torch.Tensor, counts: torch.Tensor,
                   nonfinite: torch.Tensor) -> None:
    """``vote`` in torch, on any device and without a host sync: torch.argmax (ties to the lowest
    index) and a scatter_add weighted by finiteness (a non-finite row adds 0 and is counted apart)."""
    finite = torch.isfinite(logits).all(dim=1)
    nonfinite += (~finite).sum()
    flat = slots.to(torch.int64) * counts.shape[1] + logits.argmax(dim=1)
    counts.view(-1).scatter_add_(0, flat, finite.to(counts.dtype))
