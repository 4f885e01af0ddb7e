"""Factors stored in bf16, simulated: float32 values rounded to bf16's grid and kept in float32."""
import torch

GEN = torch.Generator().manual_seed(1234)


def to_bf16_grid(t, stochastic):
    """``t`` (float32) rounded to a bf16 value: the nearest, or (stochastic) the one above or below
    with probabilities by distance, so that the expected value is ``t``."""
    if not stochastic:
        return t.to(torch.bfloat16).to(torch.float32)
    bits = t.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, t.shape, generator=GEN, dtype=torch.int32)
    return ((bits + noise) & -65536).view(torch.float32)
