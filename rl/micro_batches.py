"""RL micro-batches formed by a token budget: a rank's responses cut into forwards of at most
`micro_batch_tokens` padded tokens (rows x the longest row: `rl.experience.sequence_batch` pads every row
on the right to the longest), and the same number of forwards on every rank.

Under ZeRO-3 every forward all-gathers parameters, a collective, so the ranks must make the same number of
forwards: they agree on the most any of them needs (`agreed_micro_batches`), and each then splits its own
responses into exactly that many. Rows of similar length go together (longest first, consecutive rows),
which leaves the least padding; the split makes its largest forward as small as it can.

A row holds one response after its prompt, or, with `algo.shared_prompt`, several responses to one prompt
after a single copy of it (rl/experience.py: `shared_sequence_batch`): `response_rows` forms those rows,
each within the budget, a group too long for one split over several that each repeat the prompt.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

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


def shared_row_length(prompt_length: int, response_lengths: Sequence[int]) -> int:
    """Tokens of a shared row: the prompt but its last token once, then each response after a copy of that
    token (a row of one response is the prompt and the response)."""
    return prompt_length - 1 + sum(n + 1 for n in response_lengths)


def response_rows(
    prompts: Sequence[Hashable], prompt_lengths: Sequence[int], response_lengths: Sequence[int], budget: int,
    shared: bool,
) -> list[list[int]]:  # fmt: skip
    """Indices of responses in forward rows: one a row, or with `shared`, the responses to one prompt
    (equal `prompts` keys) together, in order of first appearance, a row taking them while it stays within
    `budget` tokens (`shared_row_length`); a response longer than that alone is a row of its own."""
    if not shared:
        return [[index] for index in range(len(prompts))]
    by_prompt: dict[Hashable, list[int]] = {}
    for index, key in enumerate(prompts):
        by_prompt.setdefault(key, []).append(index)
    rows = []
    for indices in by_prompt.values():
        row: list[int] = []
        for index in indices:
            lengths = [response_lengths[i] for i in (*row, index)]
            if row and shared_row_length(prompt_lengths[index], lengths) > budget:
                rows.append(row)
                row = []
            row.append(index)
        rows.append(row)
    return rows


def agreed_micro_batches(rows: list[list[int]], row_length, budget: int, device: torch.device) -> list[list[list[int]]]:
    """A collective of every rank: this rank's rows (lists of response indices) split into as many
    micro-batches as the rank that needs the most (an all-reduce MAX on `device`, the engine's: NCCL takes
    no CPU tensors). A rank with fewer rows than that splits its longest rows of several responses in two
    (each half repeats the prompt) until it has enough, which it can where every rank holds the same number
    of responses. `row_length(row)`: its tokens."""
    count = torch.tensor(count_micro_batches([row_length(row) for row in rows], budget), device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    rows = enough_rows(rows, int(count), row_length)
    lengths = [row_length(row) for row in rows]
    return [[rows[i] for i in group] for group in split_micro_batches(lengths, budget, int(count))]


def enough_rows(rows: list[list[int]], count: int, row_length) -> list[list[int]]:
    """At least `count` rows: the longest row of several responses cut in two while there are fewer."""
    rows = list(rows)
    while len(rows) < count:
        longest = max((row for row in rows if len(row) > 1), key=row_length)
        at = rows.index(longest)
        rows[at : at + 1] = [longest[: len(longest) // 2], longest[len(longest) // 2 :]]
    return rows
