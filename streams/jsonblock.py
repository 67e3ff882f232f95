"""A poll's values through pyarrow's JSON reader as one newline-delimited block.

The reader parses in C++, on Arrow's threads, against a fixed schema; what it cannot take as one
object per line (a refused part, a value holding a newline, a missing value) is left out, for the
caller to decode one record at a time.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.json as pj

_SMALLEST_PART = 16  # below this, refused parts go to decode() whole


def parse(
    values: Sequence[bytes | None], index: Sequence[int], options: pj.ParseOptions,
    utf8: bool = False,
) -> list[tuple[pa.Table, np.ndarray]]:  # fmt: skip
    """The records at ``index`` through pyarrow's reader, as (table, index) parts in order.

    A part the reader refuses is halved until the refused records are isolated (those are
    left out, for decode()), so one bad record costs a few small parses, not the whole poll.
    ``utf8``: refuse a part that is not UTF-8 as a whole (the reader checks only the fields it
    keeps, and a mapping ignores the others).
    """
    lines: Sequence[bytes | None] = (
        values if len(index) == len(values) else [values[i] for i in index]
    )
    block = b"\n".join(lines) if None not in lines else None  # type: ignore[arg-type]
    if block is None or block.count(b"\n") != len(lines) - 1 or b"\r" in block:
        # The reader needs one record per line: drop those it cannot take as one, once.
        index = [
            i
            for i in index
            if (v := values[i]) is not None and v[:1] == b"{" and b"\n" not in v and b"\r" not in v
        ]
        lines = [values[i] for i in index]
        block = b"\n".join(lines)  # type: ignore[arg-type]
    if not index:
        return []
    table = _read(block, lines, options, utf8)  # type: ignore[arg-type]
    if table is not None:
        return [(table, np.asarray(index, dtype=np.int64))]
    if len(index) <= _SMALLEST_PART:
        return []
    half = len(index) // 2
    return parse(values, index[:half], options, utf8) + parse(values, index[half:], options, utf8)


def _read(
    block: bytes, lines: list[bytes], options: pj.ParseOptions, utf8: bool
) -> pa.Table | None:
    """``lines`` (joined: ``block``) through pyarrow's reader; None when it refuses any line."""
    # Two blocks or more, parsed on Arrow's threads; a block must hold the longest line whole.
    size = max(len(block) // 2 + 1, max(map(len, lines)) + 1, 1 << 16)
    try:
        if utf8 and not block.isascii():
            block.decode("utf-8")
        table = pj.read_json(
            pa.BufferReader(block),
            read_options=pj.ReadOptions(use_threads=True, block_size=size),
            parse_options=options,
        )
        table.validate(full=True)  # the reader does not check that strings are UTF-8
    except (pa.ArrowException, UnicodeError, ValueError):
        return None
    # An empty or blank line gives no row: only as many rows as lines keeps rows and records
    # aligned (one line, one object; anything else is decode()'s).
    if table.num_rows != len(lines):
        return None
    return table
