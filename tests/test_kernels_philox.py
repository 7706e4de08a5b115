"""The torch reference of Philox4x32-10 equals Triton's stream (tl.randint4x, tl.rand, tl.randn) and
the kernels' own device function, integers exactly."""

import pytest
import torch
import triton
import triton.language as tl

from fastsmooth.kernels.philox import element_counters, philox4x32, philox4x32_reference, to_int32
from fastsmooth.seeding import CHUNK, LANE_RUN, MASK32, element_group_lane, philox_key as split_seed

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# Emulations of Triton's own random functions, to pin philox4x32_reference to Triton's stream.
def randint4x_reference(seed: int, offset) -> tuple:
    """``tl.randint4x(seed, offset)`` for a 64-bit offset tensor: four int64 tensors of uint32 words."""
    offset = torch.as_tensor(offset, dtype=torch.int64)
    k0, k1 = split_seed(seed)
    return philox4x32_reference(offset & MASK32, (offset >> 32) & MASK32, 0, 0, k0, k1)


def uint_to_uniform_float_reference(w: torch.Tensor) -> torch.Tensor:
    """``tl.uint_to_uniform_float`` of 32-bit words: 31-bit uniforms in [0, 1) as float32."""
    x = to_int32(w & MASK32)
    x = torch.where(x < 0, -x - 1, x)              # ~x on int32
    return x.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)


def rand_reference(seed: int, offset) -> torch.Tensor:
    """``tl.rand(seed, offset)`` (float32 in [0, 1), 31 bits of resolution)."""
    return uint_to_uniform_float_reference(randint4x_reference(seed, offset)[0])


def randn_reference(seed: int, offset) -> torch.Tensor:
    """``tl.randn(seed, offset)``: Box-Muller on the first two words, u1 floored at 1e-7."""
    w0, w1, _, _ = randint4x_reference(seed, offset)
    u1 = torch.clamp(uint_to_uniform_float_reference(w0), min=1.0e-7)
    u2 = uint_to_uniform_float_reference(w1)
    th = torch.tensor(6.283185307179586, dtype=torch.float32) * u2
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(th)


@triton.jit
def _randint4x_kernel(out_ptr, seed, off_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    off = tl.load(off_ptr + i)
    a, b, c, d = tl.randint4x(seed, off)
    tl.store(out_ptr + 4 * i + 0, a.to(tl.int32, bitcast=True))
    tl.store(out_ptr + 4 * i + 1, b.to(tl.int32, bitcast=True))
    tl.store(out_ptr + 4 * i + 2, c.to(tl.int32, bitcast=True))
    tl.store(out_ptr + 4 * i + 3, d.to(tl.int32, bitcast=True))


@triton.jit
def _rand_kernel(u_ptr, z_ptr, seed, off_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    off = tl.load(off_ptr + i)
    tl.store(u_ptr + i, tl.rand(seed, off))
    tl.store(z_ptr + i, tl.randn(seed, off))


@triton.jit
def _philox_kernel(out_ptr, c_ptr, k0, k1, N: tl.constexpr):
    i = tl.arange(0, N)
    c0 = tl.load(c_ptr + 4 * i + 0).to(tl.uint32, bitcast=True)
    c1 = tl.load(c_ptr + 4 * i + 1).to(tl.uint32, bitcast=True)
    c2 = tl.load(c_ptr + 4 * i + 2).to(tl.uint32, bitcast=True)
    c3 = tl.load(c_ptr + 4 * i + 3).to(tl.uint32, bitcast=True)
    a, b, c, d = philox4x32(c0, c1, c2, c3, k0.to(tl.uint32), k1.to(tl.uint32))
    tl.store(out_ptr + 4 * i + 0, a.to(tl.int32, bitcast=True))
    tl.store(out_ptr + 4 * i + 1, b.to(tl.int32, bitcast=True))
    tl.store(out_ptr + 4 * i + 2, c.to(tl.int32, bitcast=True))
    tl.store(out_ptr + 4 * i + 3, d.to(tl.int32, bitcast=True))


def test_known_answers():
    # Random123's kat_vectors for philox4x32-10 (Salmon et al. 2011)
    cases = [
        ((0, 0, 0, 0, 0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((MASK32,) * 6, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344, 0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for args, expected in cases:
        assert tuple(int(w) for w in philox4x32_reference(*args)) == expected


@pytest.mark.parametrize("seed", [0, 1, 12345, 2 ** 32 + 7, 2 ** 64 - 1])
def test_randint4x_matches_triton(seed):
    n = 256
    g = torch.Generator().manual_seed(seed % 1000)
    offsets = torch.cat([torch.arange(64), torch.randint(0, 2 ** 62, (n - 64,), generator=g)])
    offsets[-1] = 2 ** 32 + 3                                    # a 64-bit offset
    out = torch.empty(4 * n, dtype=torch.int32, device=DEVICE)
    _randint4x_kernel[(1,)](out, seed, offsets.to(DEVICE), N=n)
    ref = torch.stack(randint4x_reference(seed, offsets), -1).reshape(-1)
    assert torch.equal(out.cpu().to(torch.int64), to_int32(ref))


def test_rand_and_randn_match_triton():
    n, seed = 512, 987654321
    offsets = torch.arange(n, dtype=torch.int64) * 977 + 2 ** 33
    u = torch.empty(n, dtype=torch.float32, device=DEVICE)
    z = torch.empty(n, dtype=torch.float32, device=DEVICE)
    _rand_kernel[(1,)](u, z, seed, offsets.to(DEVICE), N=n)
    # uniforms: int -> float32 conversion and one float32 product: exact
    assert torch.equal(u.cpu(), rand_reference(seed, offsets))
    # normals: float32 log / sqrt / cos of the device within rounding of torch's
    torch.testing.assert_close(z.cpu(), randn_reference(seed, offsets), rtol=1e-5, atol=2e-6)


def test_device_philox_matches_reference():
    n = 256
    g = torch.Generator().manual_seed(3)
    counters = torch.randint(0, 2 ** 32, (n, 4), generator=g)
    counters[0] = 0
    counters[1] = MASK32
    k0, k1 = split_seed(0xDEADBEEF12345678)
    out = torch.empty(4 * n, dtype=torch.int32, device=DEVICE)
    _philox_kernel[(1,)](out, to_int32(counters).to(torch.int32).reshape(-1).to(DEVICE), k0, k1, N=n)
    ref = torch.stack(philox4x32_reference(*counters.unbind(1), k0, k1), -1).reshape(-1)
    assert torch.equal(out.cpu().to(torch.int64), to_int32(ref))


def test_keying_scheme_layout():
    group, lane = element_counters(3 * CHUNK + 5)
    assert all(element_group_lane(e) == (int(group[e]), int(lane[e])) for e in (0, 127, 128, 511, 512, 1540))
    # a chunk of 512 elements = 4 lanes of 128 consecutive elements, fed by 128 Philox calls
    assert group[:LANE_RUN].tolist() == list(range(LANE_RUN))
    assert lane[:CHUNK].reshape(4, LANE_RUN).tolist() == [[l] * LANE_RUN for l in range(4)]
    assert torch.equal(group[LANE_RUN:2 * LANE_RUN], group[:LANE_RUN])
    assert int(group[CHUNK]) == LANE_RUN
    # every (group, lane) is used by one element only
    assert len(set(zip(group.tolist(), lane.tolist()))) == group.numel()


def test_split_seed():
    assert split_seed(0) == (0, 0)
    assert split_seed(2 ** 32 + 5) == (5, 1)
    assert split_seed(-1) == (MASK32, MASK32)        # taken modulo 2^64, as torch.manual_seed
