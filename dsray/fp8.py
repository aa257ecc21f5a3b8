"""FP8 e4m3 block quantization: DeepSeek-V3's checkpoint format (128x128 weight blocks) and its
activation recipe (1x128 blocks along the hidden dimension, used by FP8 dispatch).

Each block is scaled so that its largest magnitude maps to e4m3's 448; `scale_inv` (fp32, one per
block) multiplies the fp8 values back. Shape legend: O rows, I columns, nO/nI blocks along each.
"""

from __future__ import annotations

import math

import torch

FP8_E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max


def check_block(block: tuple[int, int]) -> tuple[int, int]:
    if len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block):
        raise ValueError(f"block must be two positive ints, got {block!r}")
    return block[0], block[1]


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    return math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])


def _expand(scale_nOnI: torch.Tensor, block: tuple[int, int], shape: tuple[int, int]) -> torch.Tensor:
    # Blocks at the right/bottom edge are ragged when O or I is not a multiple of the block: expand to
    # whole blocks, then crop.
    return (scale_nOnI.float().repeat_interleave(block[0], 0)[: shape[0]]
            .repeat_interleave(block[1], 1)[:, : shape[1]])


def quantize_fp8_blockwise(w: torch.Tensor, block: tuple[int, int] = (128, 128)
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D weight to (float8_e4m3fn weight, fp32 scale_inv [ceil(O/bo), ceil(I/bi)]).

    scale_inv = amax(|block|) / 448, so each block uses the full e4m3 range; all-zero blocks get 1.
    `dequantize_fp8_blockwise` inverts it up to fp8 rounding."""
    block = check_block(block)
    if w.ndim != 2:
        raise ValueError(f"FP8 block quantization needs a 2-D weight, got shape {tuple(w.shape)}")
    w_OI = w.detach().float()
    if not torch.isfinite(w_OI).all():
        raise ValueError("cannot quantize a weight that contains NaN/Inf")
    (O, I), (bo, bi) = w_OI.shape, block
    nO, nI = scale_shape((O, I), block)
    # zero padding does not change a block's amax of |w|
    abs_pad = torch.nn.functional.pad(w_OI.abs(), (0, nI * bi - I, 0, nO * bo - O))
    amax_nOnI = abs_pad.view(nO, bo, nI, bi).amax(dim=(1, 3))
    scale_nOnI = torch.where(amax_nOnI > 0, amax_nOnI / FP8_E4M3_MAX, torch.ones_like(amax_nOnI))
    # clamp guards against w/scale landing a hair above 448 through fp32 division rounding
    q_OI = (w_OI / _expand(scale_nOnI, block, (O, I))).clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX)
    return q_OI.to(torch.float8_e4m3fn), scale_nOnI


def dequantize_fp8_blockwise(w_fp8: torch.Tensor, scale_inv: torch.Tensor,
                             block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """fp32 weight = w_fp8.float() * scale_inv broadcast over its block (ragged edge blocks allowed)."""
    block = check_block(block)
    if w_fp8.ndim != 2:
        raise ValueError(f"FP8 block dequantization needs a 2-D weight, got shape {tuple(w_fp8.shape)}")
    expected = scale_shape(tuple(w_fp8.shape), block)
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"scale_inv has shape {tuple(scale_inv.shape)}, expected {expected} "
                         f"for a weight of shape {tuple(w_fp8.shape)} with {block[0]}x{block[1]} blocks")
    return w_fp8.float().mul_(_expand(scale_inv, block, tuple(w_fp8.shape)))


# ---- activations: 1 x 128 blocks along the last dimension (FP8 dispatch) ----------------------------

ACT_BLOCK = 128  # DeepSeek-V3 quantises activations per token in 1 x 128 tiles (report, section 3.3)


def quantize_fp8_rows(x_TD: torch.Tensor, block: int = ACT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise rows to (float8_e4m3fn [T, D], fp32 scale_inv [T, ceil(D / block)]), one scale per
    1 x `block` tile; a ragged last tile (D not a multiple of `block`) gets its own scale.

    scale_inv = max(amax(|tile|), 1e-30) / 448: the largest magnitude of each tile maps to e4m3's 448 (the
    floor keeps all-zero tiles finite; they come back as zeros). Error (round to nearest; e4m3 has 3
    mantissa bits, smallest normal 2^-6, subnormal step 2^-9): |dequant - x| <= 2^-4 |x| + 2^-10 scale_inv
    per element, so at most 2^-4 of the tile's amax. No host sync and no checks on the values: this runs
    in the data path; NaN/Inf propagate (a tile holding one comes back non-finite)."""
    if x_TD.ndim != 2 or not isinstance(block, int) or block <= 0:
        raise ValueError(f"quantize_fp8_rows needs a 2-D tensor and a positive int block, got shape "
                         f"{tuple(x_TD.shape)} and block {block!r}")
    T, D = x_TD.shape
    nB = math.ceil(D / block)
    x_TD = x_TD.float()
    if nB * block != D:  # zero padding does not change a tile's amax
        x_TD = torch.nn.functional.pad(x_TD, (0, nB * block - D))
    x_TBb = x_TD.view(T, nB, block)
    scale_TB = x_TBb.abs().amax(dim=2).clamp_min_(1e-30) / FP8_E4M3_MAX
    # clamp guards against x/scale landing a hair above 448 through fp32 division rounding
    q_TBb = (x_TBb / scale_TB[:, :, None]).clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX)
    return q_TBb.view(T, nB * block)[:, :D].to(torch.float8_e4m3fn), scale_TB


def dequantize_fp8_rows(q_TD: torch.Tensor, scale_TB: torch.Tensor, dtype: torch.dtype = torch.float32,
                        block: int = ACT_BLOCK) -> torch.Tensor:
    """`dtype` rows = q.float() * scale_inv of its tile (the inverse of `quantize_fp8_rows`)."""
    T, D = q_TD.shape
    nB = math.ceil(D / block)
    if tuple(scale_TB.shape) != (T, nB):
        raise ValueError(f"scale_inv has shape {tuple(scale_TB.shape)}, expected {(T, nB)} for rows of "
                         f"shape {(T, D)} with 1x{block} tiles")
    x_TD = q_TD.float()
    if nB * block != D:
        x_TD = torch.nn.functional.pad(x_TD, (0, nB * block - D))
    return (x_TD.view(T, nB, block) * scale_TB.float()[:, :, None]).view(T, nB * block)[:, :D].to(dtype)
