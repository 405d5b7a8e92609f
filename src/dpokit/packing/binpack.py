"""Group variable-length items into rows of similar length, so that a batch of rows carries little padding."""

from __future__ import annotations

import heapq
import math


def pack_rows(sizes: list[int], token_budget: int) -> list[list[int]]:
    """Indices of `sizes` grouped into rows of at most max(token_budget, max(sizes)) tokens.

    Rows are padded to the longest one in a forward pass, so balanced rows matter more than full ones:
    start with the fewest rows that can hold the tokens, place items longest first into the row that holds
    the fewest tokens (LPT scheduling, within 4/3 of the best possible longest row), and open another row
    only when an item fits nowhere. An item longer than the budget gets a row of its own length.
    """
    if not sizes:
        return []
    capacity = max(token_budget, max(sizes))
    num_rows = math.ceil(sum(sizes) / capacity)
    heap = [(0, row) for row in range(num_rows)]  # (tokens in row, row index): least-filled row on top
    rows: list[list[int]] = [[] for _ in range(num_rows)]
    for index in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        filled, row = heap[0]
        if filled + sizes[index] > capacity:
            row, filled = len(rows), 0
            rows.append([])
        else:
            heapq.heappop(heap)
        rows[row].append(index)
        heapq.heappush(heap, (filled + sizes[index], row))
    return rows
