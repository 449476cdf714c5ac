"""Shared test utilities: precision-aware comparison against a float64 reference."""
from __future__ import annotations

import torch

# Relative RMS error allowed against a float64 reference, per input dtype (fp32 accumulation).
RMS_TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2, torch.float64: 1e-12}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, name: str = "") -> None:
    """Relative RMS error within the dtype's tolerance, no NaN/inf, and the same shape.

    On failure, reports the first index whose absolute error is the largest.
    """
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual64, expected64 = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.isfinite(actual64).all(), f"{name}: non-finite values at {torch.nonzero(~torch.isfinite(actual64))[:5].tolist()}"
    err = actual64 - expected64
    rms = err.pow(2).mean().sqrt().item()
    scale = expected64.pow(2).mean().sqrt().item() + 1e-30
    rel = rms / scale
    if rel > RMS_TOL[dtype]:
        worst = torch.argmax(err.abs()).item()
        index = torch.unravel_index(torch.tensor(worst), err.shape)
        idx = tuple(int(i) for i in index)
        raise AssertionError(
            f"{name}: relative RMS error {rel:.3e} > {RMS_TOL[dtype]:.1e} ({dtype}); worst at {idx}: "
            f"got {actual64[idx].item():.6g}, expected {expected64[idx].item():.6g}"
        )
