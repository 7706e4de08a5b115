"""Triton kernels of fastsmooth: fused noise + perturbation, argmax voting (see each module)."""
