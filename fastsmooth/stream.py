"""The streaming certifier's scheduler: many images in flight, each asking for copies in rounds.

The work for one image is a *procedure*, a generator that yields a round (a tuple of ``Draw``s,
ranges of that image's copy indices), receives the vote counts of each range, and so on, until it
returns its result. ``stream`` runs the procedures of a stream of images on one ``Sampler``:

* the rounds of many images are packed into *submissions* of whole batches (a round may be split
  between batches or submissions: the counts of a copy range do not depend on how it is cut,
  DESIGN §5), so every batch is full except at the very end or where the image shape changes;
* new images enter as soon as fewer than a few batches of copies wait (SUBMISSION_BATCHES);
* with ``overlap`` (CUDA) the next submission is queued before the counts of the previous one are
  read back, so the device does not wait for the host's statistics; one host sync per submission
  (at most MAX_SUBMISSION_BATCHES batches), none per batch (``Sampler.submit``);
* results come out in the order of the images, each with its share of the wall time.

Every result depends only on its image's counts, hence only on (seed, image index): not on the
batch size, on which images shared a batch, on the number of processes, or on a resume.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Generator, Iterable, Iterator, Optional, Tuple

import torch

from .sampler import Job, Sampler

SUBMISSION_BATCHES = 4      # images enter while fewer batches than this wait: rows come out soon
MAX_SUBMISSION_BATCHES = 32 # batches per submission at most with overlap (one host sync each)
MAX_IMAGES = 256            # images in flight at most (each holds its pixels and counts)


@dataclass(frozen=True)
class Draw:
    """Copies ``first_copy .. first_copy + count - 1`` of the image: their noise is keyed by
    (seed, image index, copy index), so a range gives the same counts whenever it is drawn."""

    first_copy: int
    count: int


Procedure = Generator[Tuple[Draw, ...], Tuple[torch.Tensor, ...], object]


class _Image:
    """One image in flight: its procedure, the round it waits for, the time it has used."""

    __slots__ = ("index", "x", "procedure", "counts", "missing", "seconds", "result", "done")

    def __init__(self, index: int, x: torch.Tensor, procedure: Procedure):
        self.index, self.x, self.procedure = index, x, procedure
        self.counts: list = []  # per Draw of the current round, summed over its pieces
        self.missing = 0  # copies of the current round not yet counted
        self.seconds = 0.0
        self.result = None
        self.done = False

    def advance(self, sent) -> Optional[Tuple[Draw, ...]]:
        """Run the procedure to its next round (None: it has returned its result)."""
        try:
            draws = self.procedure.send(sent)
        except StopIteration as stop:
            self.result, self.done = stop.value, True
            self.x = None
            return None
        draws = tuple(draws)
        for d in draws:
            if not isinstance(d, Draw) or d.count < 0 or d.first_copy < 0:
                raise ValueError(f"a procedure must yield Draws of non-negative ranges, got {d!r}")
        self.counts = [None] * len(draws)
        self.missing = sum(d.count for d in draws)
        return draws


@dataclass
class _Piece:
    """Copies of one Draw of one image, as packed into a submission."""

    image: _Image
    draw: int
    first_copy: int
    count: int


def stream(sampler: Sampler, items: Iterable[Tuple[int, torch.Tensor]],
           start: Callable[[int, torch.Tensor], Procedure], batch_size: int, *, overlap: bool = False,
           max_images: Optional[int] = None) -> Iterator[Tuple[object, float]]:
    """Yield (result, seconds) for each (image_index, x) of ``items``, in order.

    ``start(index, x)`` makes the image's procedure. ``items`` is read lazily, one image at a time
    when there is room; if reading it fails, the images already read are finished and handed out
    before the error is raised. ``seconds``: the image's share (by copies) of the wall time of the
    submissions that drew its copies.
    """
    return _Scheduler(sampler, items, start, batch_size, overlap, max_images or MAX_IMAGES).run()


class _Scheduler:
    def __init__(self, sampler, items, start, batch_size, overlap, max_images):
        self.sampler, self.items, self.start = sampler, iter(items), start
        self.batch_size, self.depth, self.max_images = int(batch_size), 2 if overlap else 1, int(max_images)
        self.admit_below = SUBMISSION_BATCHES * self.batch_size  # queued copies under which images enter
        # Bigger submissions only pay where a host sync costs device time (overlap: CUDA); on a CPU
        # the work is synchronous anyway and small submissions hand rows out sooner.
        self.largest = (MAX_SUBMISSION_BATCHES if overlap else SUBMISSION_BATCHES) * self.batch_size
        self.order: deque = deque()       # images in input order, until handed out
        self.queue: deque = deque()       # pieces waiting for a submission
        self.queued = 0                   # copies in queue
        self.in_flight: deque = deque()   # (pending totals, pieces, time queued)
        self.active = 0                   # images admitted and not done
        self.shape = None                 # the shape of the images in flight
        self.held = None                  # an image read but not admitted (another shape)
        self.exhausted, self.error = False, None
        self.last_back = -float("inf")

    def run(self):
        while True:
            self._admit()
            if len(self.in_flight) < self.depth and self._can_submit():
                self._submit()
                continue  # with overlap, fill the pipeline before waiting for counts
            if not self.in_flight:
                break  # nothing queued, nothing drawn: every image read is done
            self._collect()
            while self.order and self.order[0].done:
                image = self.order.popleft()
                yield image.result, image.seconds
        assert not self.order and not self.active, "an image was left unfinished"
        if self.error is not None:
            raise self.error

    # -- admission: new images while few copies wait -----------------------------------------------
    def _admit(self) -> None:
        while self.queued < self.admit_below and self.active < self.max_images:
            if self.held is not None:
                index, x = self.held
                if self.active and tuple(x.shape) != self.shape:
                    return  # another shape: once the images in flight are done
                self.held = None
            elif self.exhausted:
                return
            else:
                try:
                    index, x = next(self.items)
                except StopIteration:
                    self.exhausted = True
                    return
                except Exception as exc:  # hand out the images already read, then raise
                    self.exhausted, self.error = True, exc
                    return
                if self.active and tuple(x.shape) != self.shape:
                    self.held = (index, x)
                    return
            self.shape = tuple(x.shape)
            image = _Image(int(index), x, self.start(int(index), x))
            self.order.append(image)
            self.active += 1
            self._enqueue(image, image.advance(None))

    def _enqueue(self, image: _Image, draws) -> None:
        while draws is not None and image.missing == 0:  # a round of empty ranges: zero counts at once
            draws = image.advance(tuple(torch.zeros(self.sampler.num_classes, dtype=torch.int64) for _ in draws))
        if draws is None:
            self.active -= 1
            return
        for number, d in enumerate(draws):
            if d.count:
                self.queue.append(_Piece(image, number, d.first_copy, d.count))
                self.queued += d.count

    # -- submissions of whole batches -------------------------------------------------------------
    def _can_submit(self) -> bool:
        return self.queued >= self.batch_size or (self.queued > 0 and self._last_call())

    def _last_call(self) -> bool:
        """No image can join the queue before these copies are drawn: a partial batch is due."""
        waiting_for_results = bool(self.in_flight)
        can_admit = (self.held is None and not self.exhausted) and self.active < self.max_images
        return not waiting_for_results and not can_admit

    def _submit(self) -> None:
        take = min(self.queued, self.largest)
        if take >= self.batch_size:
            take -= take % self.batch_size  # whole batches; the rest waits for more rounds
        pieces, left = [], take
        while left:
            piece = self.queue[0]
            if piece.count <= left:
                self.queue.popleft()
                pieces.append(piece)
                left -= piece.count
            else:  # split the range: the rest stays first in the queue
                pieces.append(_Piece(piece.image, piece.draw, piece.first_copy, left))
                piece.first_copy += left
                piece.count -= left
                left = 0
        self.queued -= take
        jobs = [Job(p.image.x, p.image.index, p.first_copy, p.count) for p in pieces]
        queued_at = time.perf_counter()  # before submit: on a CPU it returns when the work is done
        self.in_flight.append((self.sampler.submit(jobs, self.batch_size), pieces, queued_at))

    def _collect(self) -> None:
        pending, pieces, queued_at = self.in_flight.popleft()
        totals = pending.result()
        back = time.perf_counter()
        share = (back - max(queued_at, self.last_back)) / max(1, sum(p.count for p in pieces))
        self.last_back = back
        for piece, counts in zip(pieces, totals):
            image = piece.image
            image.seconds += share * piece.count
            got = image.counts[piece.draw]
            image.counts[piece.draw] = counts.clone() if got is None else got + counts
            image.missing -= piece.count
            if image.missing == 0:  # the round is complete: on to the procedure's next one
                sent = tuple(c if c is not None else torch.zeros_like(counts) for c in image.counts)
                self._enqueue(image, image.advance(sent))
