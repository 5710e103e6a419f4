"""Where a job file's admission chunks fall: a pure function, no database."""

from __future__ import annotations

import pytest

from workers.store.admission import chunk_bounds


def test_chunks_start_small_and_double_up_to_the_chunk_size() -> None:
    bounds = chunk_bounds(2048, 64, 512, first_lines=64)
    assert [end - start for start, end in bounds] == [64, 128, 256, 512, 512, 512, 64]
    # Every line in exactly one chunk, in order, and every chunk but the last of whole shards
    assert [b[0] for b in bounds[1:]] == [b[1] for b in bounds[:-1]]
    assert bounds[0][0] == 0 and bounds[-1][1] == 2048
    assert all((end - start) % 64 == 0 for start, end in bounds[:-1])


def test_chunk_sizes_are_rounded_to_whole_shards_and_are_never_below_one() -> None:
    assert chunk_bounds(9, 2, 4, first_lines=1) == [(0, 2), (2, 6), (6, 9)]
    assert chunk_bounds(7, 4, 2, first_lines=2) == [(0, 4), (4, 7)]  # below a shard: one
    assert chunk_bounds(3, 1, 1, first_lines=1) == [(0, 1), (1, 2), (2, 3)]
    assert chunk_bounds(300, 1, 512, first_lines=64) == [(0, 64), (64, 192), (192, 300)]
    assert chunk_bounds(100, 32, 512, first_lines=64) == [(0, 64), (64, 100)]
    assert chunk_bounds(0, 64, 512) == []


def test_a_shard_size_below_one_is_refused_with_its_value() -> None:
    with pytest.raises(ValueError, match="got 0"):
        chunk_bounds(10, 0, 512)
