"""The fused noise + perturbation kernel equals its pure-torch reference of the same Philox stream, for
every noise and output dtype, and its copies depend only on (seed, image, copy, element)."""

import importlib
import math

import pytest
import torch

from fastsmooth.kernels import perturb, perturb_packed, perturb_packed_reference, perturb_reference
from fastsmooth.kernels import samplers
from fastsmooth.kernels.perturb import stream_values
from fastsmooth.kernels.philox import element_counters, group_words
from fastsmooth.kernels.samplers import NoisePlan
from fastsmooth.noises import make_noise
from fastsmooth.seeding import TAG_LAPLACE_TAIL

from _noise_cases import DTYPES, NOISES, assert_float_close

pk = importlib.import_module("fastsmooth.kernels.perturb")   # the module (the package's `perturb` is the function)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def noise_reference(noise, shape, seed, image_index=0, first_copy=0, copies=1, grid=None):
    """The stream's eps (float mode) or nu (grid mode) of copies of one image, shaped (copies, *shape)."""
    plan = NoisePlan(noise, math.prod(shape), grid)
    values = stream_values(plan, seed, image_index, torch.arange(first_copy, first_copy + copies))
    return values.reshape(copies, *shape)


# float32 x + eps of the kernel and of the reference differ by the rounding of the transcendental
# functions (numpy vs torch in the interpreter, the GPU's own): at most 2 float32 ulps of values
# of order 1 were seen (bench/RESULTS.md); 2e-6 absolute + relative leaves room.
F32_TOL = 2e-6


def assert_matches(out: torch.Tensor, ref: torch.Tensor):
    assert_float_close(out, ref, F32_TOL)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("key", list(NOISES))
def test_perturb_matches_reference(key, dtype):
    noise = make_noise(**NOISES[key])
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 7, 9, generator=g)                            # d = 189: one partial chunk
    seed = 2 ** 40 + 12345
    out = perturb(x.to(DEVICE), 37, noise, seed, image_index=5, first_copy=11, out_dtype=dtype)
    ref = perturb_reference(x, 37, noise, seed, image_index=5, first_copy=11, out_dtype=dtype)
    assert_matches(out, ref)


@pytest.mark.parametrize("key", ["gaussian", "laplace", "uniform", "expinf1"])
def test_perturb_multi_chunk(key):
    noise = make_noise(**NOISES[key])
    x = torch.linspace(-1, 1, 1300).reshape(13, 100)               # d = 1300: 2 full chunks + 276
    out = perturb(x.to(DEVICE), 9, noise, 7, image_index=2 ** 32 - 1, first_copy=2 ** 32 - 9)
    ref = perturb_reference(x, 9, noise, 7, image_index=2 ** 32 - 1, first_copy=2 ** 32 - 9)
    assert_matches(out, ref)


@pytest.mark.parametrize("key", ["gaussian", "expinf2"])
def test_independent_of_tile_sizes(key, monkeypatch):
    noise = make_noise(**NOISES[key])
    x = torch.rand(2, 30, 30, generator=gen(2))                                        # d = 1800
    base = perturb(x.to(DEVICE), 7, noise, 99, image_index=1)
    for P, rows in [(128, 1), (256, 4), (1024, 2)]:
        monkeypatch.setattr(pk, "choose_config", lambda d, c, t, *a, P=P, rows=rows: {"P": P, "ROWS": rows,
                                                                                  "num_warps": 4})
        assert torch.equal(perturb(x.to(DEVICE), 7, noise, 99, image_index=1), base)


@pytest.mark.parametrize("key", ["laplace", "expinf1"])
def test_copy_ranges_compose(key):
    noise = make_noise(**NOISES[key])
    x = torch.rand(1, 5, 5, generator=gen(3)).to(DEVICE)
    whole = perturb(x, 40, noise, 3, image_index=4, first_copy=100)
    parts = torch.cat([perturb(x, 13, noise, 3, image_index=4, first_copy=100),
                       perturb(x, 27, noise, 3, image_index=4, first_copy=113)])
    assert torch.equal(whole, parts)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("key", ["gaussian", "uniform", "expinf_boost"])
def test_packed_equals_single(key, dtype):
    noise = make_noise(**NOISES[key])
    xs = torch.rand(3, 2, 4, 4, generator=gen(4)).to(DEVICE)
    segments = [(2, 10, 0, 5, 7), (0, 3, 50, 4, 0), (1, 0, 8, 3, 12), (0, 3, 54, 2, 4)]
    out = torch.full((16, 2, 4, 4), -7.0, dtype=dtype, device=DEVICE)
    perturb_packed(out, xs, segments, noise, 1234)
    for slot, image, first, count, row in segments:
        single = perturb(xs[slot], count, noise, 1234, image_index=image, first_copy=first, out_dtype=dtype)
        assert torch.equal(out[row:row + count], single)
    assert (out[6] == -7).all() and (out[15] == -7).all()            # rows outside every segment
    ref = perturb_packed_reference(torch.full_like(out, -7.0), xs.cpu(), segments, noise, 1234)
    assert_matches(out, ref)


def test_segment_objects_and_channels_last():
    from fastsmooth.sampler import Segment

    noise = make_noise("gaussian", sigma=1.0)
    xs = torch.rand(2, 3, 5, 6, generator=gen(5)).to(DEVICE)
    segs = [Segment(slot=1, image_index=4, first_copy=0, count=6, row=0),
            Segment(slot=0, image_index=9, first_copy=3, count=4, row=6)]
    dense = torch.empty(10, 3, 5, 6, dtype=torch.bfloat16, device=DEVICE)
    perturb_packed(dense, xs, segs, noise, 5)
    cl = torch.empty(10, 3, 5, 6, dtype=torch.bfloat16, device=DEVICE).to(memory_format=torch.channels_last)
    perturb_packed(cl, xs, segs, noise, 5)
    assert not cl.is_contiguous()
    assert torch.equal(cl, dense)
    # a strided view of a larger buffer
    big = torch.zeros(12, 3, 5, 6, dtype=torch.bfloat16, device=DEVICE).to(memory_format=torch.channels_last)
    perturb_packed(big[:10], xs, segs, noise, 5)
    assert torch.equal(big[:10], dense) and (big[10:] == 0).all()


@pytest.mark.parametrize("shape", [(3, 16, 32), (2, 32, 48), (16, 8, 64)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("key", ["gaussian", "laplace", "uniform", "expinf1", "expinf_boost"])
def test_channels_last_kernel(key, shape):
    """Channels-last buffers with H*W a multiple of 512 take the transposing kernel: same copies."""
    noise = make_noise(**NOISES[key])
    xs = torch.rand(2, *shape, generator=gen(6)).to(DEVICE)
    segs = [(1, 4, 3, 3, 0), (0, 9, 0, 2, 3)]
    dense = torch.empty(5, *shape, dtype=torch.bfloat16, device=DEVICE)
    perturb_packed(dense, xs, segs, noise, 77)
    cl = torch.empty(5, *shape, dtype=torch.bfloat16, device=DEVICE).to(memory_format=torch.channels_last)
    perturb_packed(cl, xs, segs, noise, 77)
    assert torch.equal(cl, dense)
    ref = perturb_packed_reference(torch.empty(5, *shape, dtype=torch.bfloat16), xs.cpu(), segs, noise, 77)
    assert_matches(cl.contiguous(), ref)


def test_seed_image_copy_all_matter():
    noise = make_noise("uniform", scale=1.0)
    x = torch.zeros(64, device=DEVICE)
    a = perturb(x, 2, noise, 1)
    assert not torch.equal(a[0], a[1])                               # copy index
    assert not torch.equal(a, perturb(x, 2, noise, 2))               # seed
    assert not torch.equal(a, perturb(x, 2, noise, 1 + 2 ** 32))     # high word of the seed
    assert not torch.equal(a, perturb(x, 2, noise, 1, image_index=1))  # image index
    assert torch.equal(a, perturb(x, 2, noise, 1))                   # and nothing else


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=lambda d: str(d).split(".")[1])
def test_cancellation_near_zero(dtype):
    """x chosen so that x + eps nearly cancels: the half-precision copies still match the reference
    within the float32 tolerance (the case that a plain one-ulp test gets wrong)."""
    noise = make_noise("gaussian", sigma=1.0)
    eps = noise_reference(noise, (512,), 21, 0, 0, 4)
    x = -eps[0] + 1e-4 * torch.rand(512, generator=gen(7))
    out = perturb(x.to(DEVICE), 4, noise, 21, out_dtype=dtype)
    assert_matches(out, perturb_reference(x, 4, noise, 21, out_dtype=dtype))


def test_noise_added_in_float32():
    # x + eps is rounded once, to the output dtype: bf16(x + eps), never bf16(x) + bf16(eps)
    noise = make_noise("uniform", scale=1e-3)
    x = torch.full((256,), 1.0)
    out = perturb(x.to(DEVICE), 4, noise, 0, out_dtype=torch.bfloat16).cpu()
    eps = noise_reference(noise, (256,), 0, copies=4)
    assert torch.equal(out, (x + eps).to(torch.bfloat16))


def test_uniform_minimum_word_is_finite_everywhere():
    # the smallest uniform the samplers see is 2^-32 > 0, so -log never overflows (DESIGN §5)
    w = torch.tensor([0, 2 ** 31, 2 ** 31 - 1, 2 ** 32 - 1])
    u = samplers.u31_twin(w)
    assert (u > 0).all() and (u <= 1).all() and float(u.min()) == 2.0 ** -32
    assert torch.isfinite(-torch.log(u)).all()
    s = samplers.s32_twin(w)
    assert (s.abs() <= 1).all()


def test_box_muller_reach_and_angle_range():
    """U39 takes 31 bits of the first word and the 8 low bits of the second: the smallest radius
    uniform is 2^-40 (R = sqrt(80 log 2) = 7.45, against 6.66 with 31 bits), never 0; the angle,
    from the second word's 24 high bits, stays within (-pi, pi) and is symmetric."""
    wa = torch.tensor([0, 2 ** 31, 2 ** 31 - 1, 2 ** 32 - 1, 0])
    wb = torch.tensor([0, 2 ** 32 - 256, 2 ** 31 - 1, 2 ** 31, 255])
    cos, sin = samplers.box_muller_twin(wa, wb)
    rad, th = torch.hypot(cos, sin), torch.atan2(sin, cos)
    assert float(rad[0]) == pytest.approx(math.sqrt(80 * math.log(2)), rel=1e-6) == float(rad[1])
    assert float(rad.max()) == float(rad[0]) and abs(float(rad[3])) < 1e-4  # U39 near 1: R near 0
    assert float(rad[4]) == pytest.approx(math.sqrt(-2 * math.log(2.0 ** -31)), rel=1e-3)  # wb's low byte full
    assert (th.abs() <= float(torch.tensor(math.pi, dtype=torch.float32))).all()
    assert float(th[2]) == pytest.approx(-float(th[3]), abs=1e-6)            # S24 is symmetric
    assert float(th[0]) == pytest.approx(-float(th[1]), abs=1e-6)


# Copies of a 3 x 32 x 32 image (seed 0, image 0) whose Laplace word at one element has its 31
# magnitude bits all zero (word 0x80000000), found by a search over 7e5 copies x 768 Philox groups:
# (copy, element).
LAPLACE_FIRST_CELL_HITS = [(235062, 2607), (423471, 1519)]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("copy, element", LAPLACE_FIRST_CELL_HITS)
def test_laplace_first_cell_is_refined(copy, element, layout):
    """U31's first cell (probability 2^-31 per element: the Laplace tail past 31 log 2 lambda, which
    the 31-bit sampler put at the single value 32 log 2 lambda) takes 31 more bits from the
    TAG_LAPLACE_TAIL word of the same counter; the kernel equals its reference there."""
    noise = make_noise("laplace", scale=0.3)
    (group,), (lane,) = (t[[element]].tolist() for t in element_counters(3072))
    assert int(group_words(0, 0, torch.tensor([copy]), 3072)[0, group, lane]) == 0x80000000
    tail = int(group_words(0, 0, torch.tensor([copy]), 3072, TAG_LAPLACE_TAIL)[0, group, lane])
    expected = -0.3 * -math.log(((tail & 0x7FFFFFFF) + 0.5) * 2.0 ** -62)      # top bit set: negative
    out = torch.zeros(3, 3, 32, 32, device=DEVICE)
    if layout == "channels_last":
        out = out.to(memory_format=torch.channels_last)
    perturb_packed(out, torch.zeros(1, 3, 32, 32, device=DEVICE), [(0, 0, copy - 1, 3, 0)], noise, 0)
    ref = noise_reference(noise, (3, 32, 32), 0, 0, copy - 1, 3)
    assert_matches(out, ref)
    value = float(out.reshape(3, -1)[1, element])
    assert value == pytest.approx(expected, rel=1e-6) and value <= -0.3 * 31 * math.log(2)
    assert value != pytest.approx(-0.3 * 32 * math.log(2), rel=1e-3)       # not the cell's midpoint
    assert float(ref.reshape(3, -1)[[0, 2]].abs().max()) < 0.3 * 31 * math.log(2)


def test_bad_arguments():
    noise = make_noise("gaussian", sigma=1)
    x = torch.zeros(8, device=DEVICE)
    with pytest.raises(TypeError):
        perturb(x, 2, noise, 0, out_dtype=torch.int32)
    with pytest.raises(ValueError):
        perturb(x, 2, noise, 0, first_copy=2 ** 32 - 1)
    with pytest.raises(IndexError):
        perturb_packed(torch.empty(2, 8, device=DEVICE), x[None], [(0, 0, 0, 3, 0)], noise, 0)
    assert perturb(x, 0, noise, 0).shape == (0, 8)


# -- grid mode: x = k / G, the model input fl32((k + nu) / G) with nu drawn exactly ------------------

GRID_NOISES = ["gaussian", "laplace", "uniform", "expinf1", "expinf2", "expinf_boost"]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("key", GRID_NOISES)
def test_grid_kernel_equals_reference_exactly(key, dtype):
    """The kernel's integers are the reference's: the model inputs are bit-identical (the division is
    IEEE on both sides), in contiguous, strided and channels-last buffers."""
    noise = make_noise(**NOISES[key])
    k = torch.randint(0, 256, (2, 3, 16, 32), generator=gen(8), dtype=torch.int32)   # HW = 512: cl kernel
    segs = [(1, 4, 3, 5, 0), (0, 9, 2 ** 32 - 4, 4, 5)]
    ref = perturb_packed_reference(torch.empty(9, 3, 16, 32, dtype=dtype), k, segs, noise, 5, grid=255)
    for layout in ("contiguous", "channels_last", "strided"):
        out = torch.empty(9, 3, 16, 32, dtype=dtype, device=DEVICE)
        if layout == "channels_last":
            out = out.to(memory_format=torch.channels_last)
        elif layout == "strided":
            out = torch.empty(9, 3, 32, 16, dtype=dtype, device=DEVICE).transpose(2, 3)
        perturb_packed(out, k.to(DEVICE), segs, noise, 5, grid=255)
        assert torch.equal(out.cpu(), ref), layout


@pytest.mark.parametrize("key", GRID_NOISES)
def test_grid_inputs_are_grid_values(key):
    """Every model input is fl32(v / 255) for an integer v = k + nu (one float per integer), and
    nu = round(255 delta) is the reference's."""
    noise = make_noise(**NOISES[key])
    k = torch.randint(0, 256, (1, 700), generator=gen(9), dtype=torch.int32)
    out = perturb(k[0].to(DEVICE), 6, noise, 3, image_index=2, grid=255).cpu()
    nu = noise_reference(noise, (700,), 3, 2, 0, 6, grid=255)
    v = k[0].to(torch.int64) + nu
    assert torch.equal(out, v.to(torch.float32) / 255)
    assert torch.equal(torch.round(out.double() * 255).to(torch.int64), v)


def test_grid_alias_ties_are_refined_by_the_low_word():
    """A word whose bucket bits tie with the threshold's high bits is decided by the element's
    TAG_GRID_LOW word, in the kernel as in the reference: found by search, the tie changes the value."""
    from fastsmooth.grid import alias_table
    from fastsmooth.kernels.philox import element_words

    noise = make_noise("gaussian", sigma=0.25)
    table = alias_table("gaussian", 0.25, 255)
    shift = 32 - table.bits
    w = element_words(0, 0, torch.arange(4096), 512)                      # 2 M words
    tie = (w & ((1 << shift) - 1)) == table.threshold_hi[w >> shift]
    assert tie.any(), "no tie in 2 M words: the search range is too small for this table"
    copy, element = (int(i) for i in tie.nonzero()[0])
    k = torch.full((512,), 128, dtype=torch.int32)
    out = perturb(k.to(DEVICE), 1, noise, 0, first_copy=copy, grid=255).cpu()
    ref = perturb_reference(k, 1, noise, 0, first_copy=copy, grid=255)
    assert torch.equal(out, ref)
    low = int(element_words(0, 0, torch.tensor([copy]), 512, 4)[0, element])   # TAG_GRID_LOW
    i = int(w[copy, element] >> shift)
    expected = (i if low < int(table.threshold_lo[i]) else int(table.alias[i])) - table.offset
    assert round(float(out[0, element]) * 255) - 128 == expected
