"""Many processes (torchrun) and resumable output files for `fastsmooth certify | predict`.

    torchrun --nproc_per_node=N -m fastsmooth certify ... --out OUT.tsv      (multi-node: torchrun's flags)

Processes. Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK in the environment) each process joins the
job's process group (gloo on CPUs, NCCL on GPUs, process k on cuda:LOCAL_RANK) and loads the model
and the data itself. Rank 0 alone decides what is left to do (it folds the rows of an interrupted run
into OUT, see below) and publishes the list of pending image indices in the job's key-value store
(the TCPStore that torchrun / init_process_group already run). Images are handed out dynamically:
a process takes the next pending image with the store's atomic ``add``, so a process whose images are
cheap simply takes more of them and nobody waits for a fixed share. Everything else goes through the
store too (no collective, hence no collective timeout however long an image takes): a process that
fails says so there, and the others stop instead of waiting for it.

Output files. Each process writes the rows it certifies to its own part file ``OUT.rankK.part``
(a header, then one whole, flushed row per image, in the order it certified them), created at its
first row together with the settings file ``OUT.meta.json`` (a run that fails before its first row
leaves nothing behind). When every
process is done, rank 0 merges OUT (rows of earlier runs) and the parts into OUT in index order
(temporary file + rename), then deletes the parts. Multi-node runs need OUT on a filesystem that
every node sees. The noise of an image is a pure function of (seed, image index, copy index), so
the merged rows equal a single-process run's rows (every column but time), whichever process took
which image and whichever images shared a batch.

Resume. ``--resume`` folds the complete rows of OUT and of any ``OUT.rank*.part`` (written by a run
with any number of processes) into OUT, in index order, and certifies the rest. A torn last line
(the row in progress at a ``kill -9``) is dropped, never read as a result; a row present twice (a
kill between the merge and the deletion of the parts) is kept once.
"""

from __future__ import annotations

import json
import os
import time
from typing import Dict, Optional

import torch

from .results import part_path, read_rows, write_rows

class PeerFailed(RuntimeError):
    """Another process of the job failed (it reported its own error)."""



# -- processes ------------------------------------------------------------------------------------

class Context:
    """This process's place in a torchrun job, and the job's key-value store."""

    POLL_S = (0.005, 0.1)  # first and longest wait between two looks at the store

    def __init__(self, rank: int, world_size: int, local_rank: int):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.store = None
        self._initialized = False

    @classmethod
    def from_env(cls) -> Optional["Context"]:
        """The torchrun job this process belongs to; None for a single process."""
        try:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            rank = int(os.environ.get("RANK", "0"))
            local = int(os.environ.get("LOCAL_RANK", str(rank)))
        except ValueError:
            raise ValueError("RANK, WORLD_SIZE and LOCAL_RANK must be integers") from None
        if world <= 1:
            return None
        if not 0 <= rank < world:
            raise ValueError(f"RANK={rank} outside 0..WORLD_SIZE-1={world - 1}")
        return cls(rank, world, local)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def init(self, device: torch.device) -> None:
        """Join the process group (gloo on CPUs, NCCL on GPUs) and take a namespace in its store."""
        import torch.distributed as dist

        if not dist.is_available():
            raise RuntimeError("this torch has no torch.distributed")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            self._initialized = True
        # torchrun's agent keeps its store across restarts of the workers: one namespace per attempt.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.store = dist.PrefixStore(f"fastsmooth/{attempt}/", dist.distributed_c10d._get_default_store())

    def close(self) -> None:
        if self._initialized:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._initialized = False

    # -- store protocol ------------------------------------------------------------------------
    def publish(self, key: str, value) -> None:
        self.store.set(key, json.dumps(value))

    def _failure(self) -> Optional[str]:
        if self.store.check(["failed"]):
            return self.store.get("failed").decode("utf-8", "replace")
        return None

    def _poll(self, ready) -> None:
        wait = self.POLL_S[0]
        while not ready():
            failure = self._failure()
            if failure is not None:
                raise PeerFailed(failure)
            time.sleep(wait)
            wait = min(wait * 2, self.POLL_S[1])

    def wait_for(self, key: str):
        """The value rank 0 published under ``key`` (raises PeerFailed if a process failed first)."""
        self._poll(lambda: self.store.check([key]))
        return json.loads(self.store.get(key))

    def fail(self, message: str) -> None:
        """Tell the other processes that this one failed (best effort)."""
        try:
            if self.store is not None and not self.store.check(["failed"]):
                self.store.set("failed", f"rank {self.rank}: {message}")
        except Exception:  # the store may be gone already
            pass

    def claim(self) -> int:
        """The next position in the pending list (atomic over all processes)."""
        return int(self.store.add("next", 1)) - 1

    def count_row(self, copies: int = 0):
        """Count one more row written by any process, and the copies behind it; returns (rows,
        copies) of every process so far."""
        return int(self.store.add("rows", 1)), int(self.store.add("copies", int(copies)))

    def finish(self, rows: int) -> None:
        self.store.set(f"rows/{self.rank}", str(rows))
        self.store.add("finished", 1)

    def wait_all_finished(self) -> Dict[int, int]:
        """(rank 0) Wait until every process has finished; {rank: rows it wrote}."""
        self._poll(lambda: int(self.store.add("finished", 0)) >= self.world_size)
        return {r: int(self.store.get(f"rows/{r}")) for r in range(self.world_size)}


def merge_parts(out: str, columns, expected: Dict[int, int]) -> None:
    """(rank 0) Merge OUT and the part files of ranks ``expected`` into OUT, then delete the parts.

    expected: {rank: number of rows that process says it wrote}; a missing or short part (a node
    that does not share OUT's filesystem) is an error and nothing is deleted. A process that wrote
    no row has no part.
    """
    rows = read_rows(out, columns) if os.path.exists(out) else {}
    parts = []
    for rank, count in sorted(expected.items()):
        path = part_path(out, rank)
        if count == 0 and not os.path.exists(path):
            continue
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found: every process must see --out's directory "
                                    "(a shared filesystem on multi-node runs); rerun with --resume")
        got = read_rows(path, columns)
        if len(got) != count:
            raise ValueError(f"{path} holds {len(got)} rows, its process wrote {count}; rerun with --resume")
        for index, line in got.items():
            rows.setdefault(index, line)
        parts.append(path)
    write_rows(out, columns, rows)
    for path in parts:
        os.remove(path)
