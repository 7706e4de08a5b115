"""Noise cases and the float-mode comparison shared by the kernel and backend tests."""

import torch

NOISES = {
    "gaussian": dict(name="gaussian", sigma=0.5),
    "laplace": dict(name="laplace", scale=0.3),
    "uniform": dict(name="uniform", sigma=0.25),
    "expinf1": dict(name="expinf", k=1.0, sigma=0.5),
    "expinf2": dict(name="expinf", k=2.0, scale=0.2),
    "expinf_boost": dict(name="expinf", k=500.0, scale=0.2),      # d/k < 1: Gamma boost
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def assert_float_close(out: torch.Tensor, ref: torch.Tensor, f32_tol: float):
    """float32: within f32_tol; bf16 / fp16: within one ulp of the output dtype beyond f32_tol (a
    float32 difference can move x + eps across a rounding boundary, and where x + eps nearly
    cancels, a float32 difference is many ulps of the tiny result)."""
    assert out.shape == ref.shape and out.dtype == ref.dtype
    out, ref = out.cpu(), ref.cpu()
    a, b = out.float(), ref.float()
    assert torch.isfinite(a).all()
    if out.dtype == torch.float32:
        torch.testing.assert_close(a, b, rtol=f32_tol, atol=f32_tol)
    else:
        fi = torch.finfo(out.dtype)
        mag = torch.maximum(a.abs(), b.abs()).clamp(min=fi.tiny)
        ulp = fi.eps * torch.exp2(torch.frexp(mag).exponent.float() - 1)
        allowed = ulp + f32_tol * torch.clamp(b.abs(), min=1.0)
        assert ((a - b).abs() <= allowed).all(), float(((a - b).abs() / ulp).max())
