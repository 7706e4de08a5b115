"""The noise of (seed, image, copy, element) is a pure function of those four numbers under a full-width
key, collision-free by construction (DESIGN §5), and calls without an image index never repeat noise."""

import threading

import pytest
import torch
from torch import nn

from fastsmooth import Gaussian, Smooth, Uniform
from fastsmooth.backends import draw_noise
from fastsmooth.kernels.philox import counter_words, stream_permutation
from fastsmooth.seeding import (AUTO_INDEX_BASE, DOMAIN_TRAIN, INDEX_LIMIT, check_copy_range, fresh_image_index,
                                philox_key)


def test_torch_cpu_generator_keeps_only_32_bits_of_its_seed():
    """Why nothing is seeded through torch.Generator: seeds 2^32 apart give one stream."""
    a = torch.randn(4, generator=torch.Generator().manual_seed(5))
    b = torch.randn(4, generator=torch.Generator().manual_seed(5 + 2 ** 32))
    assert torch.equal(a, b)
    # the stream's key keeps both halves of a 64-bit seed
    assert philox_key(5) != philox_key(5 + 2 ** 32)
    x = draw_noise(Uniform(scale=1.0), 2, (8,), seed=5, image_index=0)
    y = draw_noise(Uniform(scale=1.0), 2, (8,), seed=5 + 2 ** 32, image_index=0)
    assert not torch.equal(x, y)


def test_no_two_copies_share_noise_over_2_18_chunks():
    """256 images x 65,536 copies = 2^18 chunks of 64 copies (the run in which per-chunk torch generators
    made 896 of 16.7 M copies repeat another copy's noise): no two of the 16.7 M copies are equal. Each
    copy's four float32 values (about 100 random bits) are folded into one 64-bit key; two distinct
    copies share a key by chance with probability below 2^-17 over the whole run."""
    noise = Uniform(scale=1.0)
    keys = []
    for image in range(256):
        bits = draw_noise(noise, 65536, (4,), seed=0, image_index=image).view(torch.int32).to(torch.int64)
        a = (bits[:, 0] << 32) | (bits[:, 1] & 0xFFFFFFFF)
        b = (bits[:, 2] << 32) | (bits[:, 3] & 0xFFFFFFFF)
        keys.append(a * -7046029254386353131 + b)                  # wraps modulo 2^64
    keys = torch.cat(keys)
    assert keys.numel() == 2 ** 24 and torch.unique(keys).numel() == 2 ** 24


def test_the_pair_that_collided_does_not():
    """Seed 0, image 1 chunk 988 and image 9 chunk 931 (64 copies each) shared their noise under the
    old per-chunk generator seeding; their copies now differ in every element."""
    noise = Gaussian(sigma=1.0)
    a = draw_noise(noise, 64, (3, 8, 8), seed=0, image_index=1, first_copy=988 * 64)
    b = draw_noise(noise, 64, (3, 8, 8), seed=0, image_index=9, first_copy=931 * 64)
    assert not (a == b).any()


def test_domains_and_tags_separate_the_uses_of_one_seed():
    noise = Uniform(scale=1.0)
    certify = draw_noise(noise, 16, (8,), seed=3, image_index=2)
    training = draw_noise(noise, 16, (8,), seed=3, image_index=2, domain=DOMAIN_TRAIN)
    assert not (certify == training).any()
    # data-order words: a permutation, reproducible, different per epoch
    p0, p1 = stream_permutation(3, 7, 0, 1000), stream_permutation(3, 7, 1, 1000)
    assert sorted(p0.tolist()) == list(range(1000)) and not torch.equal(p0, p1)
    assert torch.equal(p0, stream_permutation(3, 7, 0, 1000))
    w = counter_words(3, 7, 0, 10, 20)
    assert torch.equal(w, counter_words(3, 7, 0, 0, 30)[10:])        # a run of words composes


def test_index_limits():
    check_copy_range(INDEX_LIMIT - 1, INDEX_LIMIT - 5, 5)
    with pytest.raises(ValueError):
        check_copy_range(INDEX_LIMIT, 0, 1)
    with pytest.raises(ValueError):
        check_copy_range(0, INDEX_LIMIT - 2, 3)
    with pytest.raises(ValueError):
        check_copy_range(-1, 0, 1)


def test_fresh_indices_are_process_wide_and_thread_safe():
    taken = []

    def take():
        taken.extend(fresh_image_index() for _ in range(200))

    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(taken)) == 800 and min(taken) >= AUTO_INDEX_BASE


def test_two_instances_without_an_index_never_share_noise():
    """`for x in data: Smooth(model, ...).certify(x)`: each instance's call takes a fresh index."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    x = torch.zeros(3, 2, 2)
    certs = [Smooth(model, 3, Gaussian(sigma=1.0), precision="fp32").certify(x, n0=20, n=400) for _ in range(3)]
    assert len({c.image_index for c in certs}) == 3
    assert not torch.equal(certs[0].counts, certs[1].counts)
