"""Shared pytest setup.

Triton kernels run on the CPU through Triton's interpreter when no GPU is present (DESIGN §7): the
variable must be set before triton is first imported, hence here, at collection time.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The engine's "auto" choices follow fixed rules in the suite (no timed calibration, no compile
# decision): results must not depend on how busy the machine is, and models that record their inputs
# see no probe forwards. The tests of the timed choices turn it back on (tests/test_tuning.py).
os.environ.setdefault("FASTSMOOTH_TUNING", "off")


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """One intra-op thread for the whole suite: its tensors are tiny, and on a shared 2-core machine
    a parallel ATen op can wait a whole scheduler quantum (~11 ms) for its second thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _fresh_indices_from_the_base(monkeypatch):
    """Each test takes the automatic image indices (calls without image_index) from 2^31 up, as a
    fresh process would: its noise then does not depend on which tests ran before it."""
    import itertools

    from fastsmooth import seeding

    monkeypatch.setattr(seeding, "_auto_indices", itertools.count(seeding.AUTO_INDEX_BASE))


@pytest.fixture
def compiled_calls(monkeypatch, tmp_path):
    """The batch sizes of every call through a compiled model (tuning.CompiledModel), into a cold
    inductor cache of the test's own."""
    from fastsmooth import tuning

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    calls = []
    real_call = tuning.CompiledModel.__call__

    def spy(self, x):
        calls.append(x.shape[0])
        return real_call(self, x)

    monkeypatch.setattr(tuning.CompiledModel, "__call__", spy)
    return calls
