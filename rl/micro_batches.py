"""RL micro-batches formed by a token budget: a rank's responses cut into forwards of at most
`micro_batch_tokens` padded tokens (rows x the longest row: `rl.experience.sequence_batch` pads every row
on the right to the longest), and the same number of forwards on every rank.

Under ZeRO-3 every forward all-gathers parameters, a collective, so the ranks must make the same number of
forwards: they agree on the most any of them needs (`agreed_micro_batches`), and each then splits its own
responses into exactly that many. Rows of similar length go together (longest first, consecutive rows),
which leaves the least padding; the split makes its largest forward as small as it can.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist


def padded_tokens(lengths: Sequence[int]) -> int:
    """What one forward over rows of these lengths costs, in tokens: rows x the longest."""
    return len(lengths) * max(lengths, default=0)


def longest_first(lengths: Sequence[int]) -> list[int]:
    """Indices into `lengths`, longest first; ties in index order."""
    return sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))


def fill(order: list[int], lengths: Sequence[int], cap: int) -> list[list[int]]:
    """Consecutive rows of `order` (longest first), each forward taking rows while rows x its first (its
    longest) row's length stays within `cap`. A row longer than `cap` is a forward of its own."""
    groups: list[list[int]] = []
    for index in order:
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= cap:
            groups[-1].append(index)
        else:
            groups.append([index])
    return groups


def count_micro_batches(lengths: Sequence[int], budget: int) -> int:
    """The fewest forwards of at most `budget` padded tokens that hold rows of these lengths (tokens
    each). A row longer than the budget is a forward of its own, the only kind that exceeds it."""
    return len(fill(longest_first(lengths), lengths, budget))


def split_micro_batches(lengths: Sequence[int], budget: int, count: int) -> list[list[int]]:
    """Exactly `count` micro-batches, each a list of indices into `lengths`, every index in one of them.

    `count` is at least `count_micro_batches(lengths, budget)` (a rank may be asked for more forwards
    than it needs, never fewer) and at most `len(lengths)`: no micro-batch is empty. Each holds at most
    `budget` padded tokens, or is a single row longer than that. Rows are taken longest first, consecutive
    rows together; the largest forward is made as small as `count` forwards allow, and while there are
    fewer than `count`, the costliest one with two rows or more is cut in two.
    """
    needed = count_micro_batches(lengths, budget)
    if not needed <= count <= len(lengths):
        raise ValueError(
            f"{len(lengths)} rows under a budget of {budget} tokens need {needed} micro-batches: "
            f"{count} is not between that and the number of rows"
        )
    order = longest_first(lengths)
    low, high = 1, budget  # the smallest cap at which `fill` needs at most `count` forwards
    while low < high:
        middle = (low + high) // 2
        if len(fill(order, lengths, middle)) <= count:
            high = middle
        else:
            low = middle + 1
    groups = fill(order, lengths, high)
    while len(groups) < count:
        costliest = max((g for g in groups if len(g) > 1), key=lambda g: padded_tokens([lengths[i] for i in g]))
        # cut where the larger half is smallest: rows before the cut cost its first row's length each
        cut = min(
            range(1, len(costliest)),
            key=lambda k: max(k * lengths[costliest[0]], (len(costliest) - k) * lengths[costliest[k]]),
        )
        at = groups.index(costliest)
        groups[at : at + 1] = [costliest[:cut], costliest[cut:]]
    return groups


def agreed_micro_batches(lengths: Sequence[int], budget: int, device: torch.device) -> list[list[int]]:
    """A collective of every rank: this rank's rows split into as many micro-batches as the rank that
    needs the most (an all-reduce MAX on `device`, the engine's: NCCL takes no CPU tensors). Every rank
    must hold at least that many rows, which holds where every rank holds the same number."""
    count = torch.tensor(count_micro_batches(lengths, budget), device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return split_micro_batches(lengths, budget, int(count))
