"""Where each rank's slice sits in the global sequences (`RankSpan`), and the point-to-point links
between neighbouring ranks: torch.distributed (`_GroupLink`) or in-process queues (`SimulatedGroup`)."""
from __future__ import annotations

import bisect
import collections
import dataclasses
from collections.abc import Sequence

import torch
import torch.distributed as dist

TAG_STATE, TAG_STATE_GRAD, TAG_LSE, TAG_LSE_GRAD = 71, 72, 73, 74  # gloo matches messages by tag
NEXT, PREVIOUS = 1, -1

# ----------------------------------------------------------------------------------------------
# Where the rank's slice sits in the global sequence(s)
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RankSpan:
    """The part of the global problem one rank holds, and what it exchanges with its neighbours."""
    rank: int
    offset: int  # global position of the first local token
    length: int  # T_r
    head: int  # tokens before the first sequence start in the slice; == length when none starts here
    head_rows: tuple[int, ...]  # state rows (sequences) of the head tokens; () when head == 0
    tail_rows: tuple[int, ...]  # state rows of the sequences that start in the slice
    tail_bounds: tuple[int, ...] | None  # local cu_seqlens of the tail [head, length); None without varlen
    carry: int  # state rows passed between neighbours: B, or 1 with cu_seqlens
    receives: bool  # the first token continues a sequence of rank r-1
    sends: bool  # the last token's sequence continues on rank r+1

    @property
    def inside(self) -> bool:
        return self.head == self.length

    @property
    def head_ends_here(self) -> bool:
        return not (self.inside and self.sends)

    @property
    def visible_tail_rows(self) -> tuple[int, ...]:
        """Sequences of the tail whose final state is on this rank."""
        return self.tail_rows[:len(self.tail_rows) - self.carry] if self.sends else self.tail_rows


def plan_span(rank: int, lengths: Sequence[int], batch: int, bounds: Sequence[int] | None) -> RankSpan:
    """The RankSpan of `rank` given every rank's T_r and the global cu_seqlens values (or None)."""
    offset, length, world = sum(lengths[:rank]), lengths[rank], len(lengths)
    end = offset + length
    if bounds is None:  # B independent sequences, each spanning all ranks
        rows = tuple(range(batch))
        if rank == 0:
            return RankSpan(rank, offset, length, 0, (), rows, None, batch, False, world > 1)
        return RankSpan(rank, offset, length, length, rows, (), None, batch, True, rank < world - 1)
    starts = range(bisect.bisect_left(bounds, offset), min(bisect.bisect_left(bounds, end), len(bounds) - 1))
    first = bisect.bisect_right(bounds, offset) - 1  # the sequence holding the first local token
    last = bisect.bisect_right(bounds, end - 1) - 1
    head = bounds[starts[0]] - offset if starts else length
    tail_bounds = tuple(bounds[n] - offset - head for n in starts) + (length - head,) if starts else None
    return RankSpan(rank, offset, length, head, (first,) if head else (), tuple(starts), tail_bounds, 1,
                    bounds[first] < offset, bounds[last + 1] > end)


# ----------------------------------------------------------------------------------------------
# Links: point-to-point messages to the neighbouring ranks
# ----------------------------------------------------------------------------------------------


class _GroupLink:
    """torch.distributed point-to-point messages within `group` (NCCL on GPU, gloo on CPU)."""

    def __init__(self, group):
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self._pending = []

    def send(self, tensor, step, tag):
        tensor = tensor.contiguous()
        self._pending.append((dist.isend(tensor, group=self.group, group_dst=self.rank + step, tag=tag), tensor))

    def recv(self, numel, dtype, device, step, tag):
        buffer = torch.empty(numel, dtype=dtype, device=device)
        dist.irecv(buffer, group=self.group, group_src=self.rank + step, tag=tag).wait()
        return buffer

    def flush(self):
        for work, _ in self._pending:
            work.wait()
        self._pending.clear()

    def gather(self, row: torch.Tensor):
        rows = [torch.empty_like(row) for _ in range(self.world)]
        dist.all_gather(rows, row, group=self.group)
        return [r.tolist() for r in rows]


class SimulatedGroup:
    """R ranks in one process, for tests and single-device simulation: pass `group=sim.rank(r)`
    (with `rank_lengths`). Messages wait in in-memory queues, so run the ranks' forwards in rank
    order and their backwards in reverse rank order (each message goes to a rank that runs later)."""

    def __init__(self, world_size: int):
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive int, got {world_size!r}")
        self.world = world_size
        self.queues = collections.defaultdict(collections.deque)

    def rank(self, rank: int) -> _SimulatedLink:
        if not 0 <= rank < self.world:
            raise ValueError(f"rank must be in [0, {self.world}), got {rank}")
        return _SimulatedLink(self, rank)


class _SimulatedLink:
    def __init__(self, owner: SimulatedGroup, rank: int):
        self.owner, self.rank, self.world = owner, rank, owner.world

    def send(self, tensor, step, tag):
        self.owner.queues[(self.rank, self.rank + step, tag)].append(tensor.detach().clone())

    def recv(self, numel, dtype, device, step, tag):
        queue = self.owner.queues[(self.rank + step, self.rank, tag)]
        if not queue:
            raise RuntimeError(f"simulated rank {self.rank} waits for a message from rank {self.rank + step} that "
                               "was not sent: run forwards in rank order and backwards in reverse rank order")
        message = queue.popleft()
        if message.numel() != numel:
            raise RuntimeError(f"simulated rank {self.rank} expected {numel} values, got {message.numel()}")
        return message

    def flush(self):
        pass

    gather = None  # no collective: rank_lengths must be given


class IsolatedRank:
    """Rank `rank` of a `world_size`-rank group whose neighbours answer at once with zeros and drop
    what it sends: to time one rank's own work on one device (bench/cp_sim.py); needs rank_lengths."""

    def __init__(self, rank: int, world_size: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.rank, self.world = rank, world_size

    def send(self, tensor, step, tag):
        pass

    def recv(self, numel, dtype, device, step, tag):
        return torch.zeros(numel, dtype=dtype, device=device)

    def flush(self):
        pass

    gather = None


def make_link(group):
    if isinstance(group, (_SimulatedLink, IsolatedRank)):
        return group
    if group is None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("group=None needs torch.distributed initialised (init_process_group); or pass a "
                             "ProcessGroup, or SimulatedGroup(R).rank(r) to simulate R ranks in one process")
        group = dist.group.WORLD
    elif not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup, None (the default group) or "
                        f"SimulatedGroup(...).rank(r) or IsolatedRank, got {type(group).__name__}")
    return _GroupLink(group)
