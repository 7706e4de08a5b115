"""The voting kernel equals torch.argmax + bincount: ties to the lowest index, non-finite rows counted
apart and never voted, every logits dtype, several images per batch."""

import pytest
import torch

from fastsmooth.kernels import vote, vote_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def run_both(logits, slots, m, start=None):
    k = logits.shape[1]
    counts = torch.zeros(m, k, dtype=torch.int64) if start is None else start.clone()
    bad = torch.zeros(1, dtype=torch.int64)
    c_dev, b_dev = counts.clone().to(DEVICE), bad.clone().to(DEVICE)
    vote(logits.to(DEVICE), slots.to(DEVICE), c_dev, b_dev)
    vote_reference(logits, slots, counts, bad)
    return c_dev.cpu(), b_dev.cpu(), counts, bad


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("k", [1, 2, 10, 1000])
def test_votes_equal_reference_with_ties(k, dtype):
    g = torch.Generator().manual_seed(k)
    b, m = 257, 3
    logits = torch.randint(-2, 3, (b, k), generator=g).to(dtype)      # many ties
    slots = torch.randint(0, m, (b,), generator=g)
    c, bad, c_ref, bad_ref = run_both(logits, slots, m)
    assert torch.equal(c, c_ref) and int(bad) == 0
    # and torch.bincount of the argmax, image by image
    for s in range(m):
        rows = logits[slots == s].float()
        assert torch.equal(c[s], torch.bincount(rows.argmax(dim=1), minlength=k))


def test_ties_go_to_lowest_index():
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0], [0.0, 0.0, 0.0, 0.0], [-1.0, -1.0, -5.0, -1.0],
                           [0.0, -0.0, 0.0, 1e-30]])
    c, bad, _, _ = run_both(logits, torch.zeros(4, dtype=torch.int64), 1)
    assert c.tolist() == [[2, 1, 0, 1]] and int(bad) == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
def test_nonfinite_rows_are_counted_not_voted(dtype):
    logits = torch.zeros(6, 5, dtype=dtype)
    logits[:, 2] = 1
    logits[0, 0] = float("nan")          # torch.argmax would vote class 0 for this row
    logits[1, 4] = float("inf")
    logits[2, 1] = -float("inf")
    logits[3] = float("nan")
    slots = torch.tensor([0, 0, 1, 1, 1, 0])
    c, bad, c_ref, bad_ref = run_both(logits, slots, 2)
    assert int(bad) == 4 == int(bad_ref)
    assert c.tolist() == [[0, 0, 1, 0, 0], [0, 0, 1, 0, 0]] and torch.equal(c, c_ref)


def test_accumulates_and_handles_wide_strided_logits():
    g = torch.Generator().manual_seed(5)
    k = 5000                                                         # several column blocks
    base = torch.randn(20, 2 * k, generator=g)
    logits = base[:, ::2]                                            # non-contiguous
    logits[3, 4097] = 100.0                                          # winner in a later block
    logits[4, 10] = logits[4, 4500] = 100.0                          # tie across blocks: lowest wins
    slots = torch.randint(0, 2, (20,), generator=g)
    start = torch.randint(0, 10, (2, k), generator=g)
    c, bad, c_ref, _ = run_both(logits, slots, 2, start)
    assert torch.equal(c, c_ref) and int(bad) == 0
    assert int(c.sum() - start.sum()) == 20


def test_empty_batch():
    c, bad, _, _ = run_both(torch.zeros(0, 3), torch.zeros(0, dtype=torch.int64), 1)
    assert int(c.sum()) == 0 and int(bad) == 0
