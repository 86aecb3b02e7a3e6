"""What a partial download has proven, checked against the simplest model: a set of byte offsets.

`merged` must cover exactly the bytes of the spans written, `gaps` exactly the rest of
[0, size), and `prefix` exactly the bytes from 0 on without a hole: a byte too many is a
byte never fetched (a corrupt file), a byte too few is fetched again. Zero-length spans
prove nothing and never stop the spans after them from counting.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.errors import DownloadError
from orchestrator.sim import Simulator
from orchestrator.store.parts import PartRecord, Span, gaps, merged
from orchestrator.transfer.ranges import _hash_range
from orchestrator.transfer.verify import READ_BYTES, Hashes

from .campaigns import assert_campaign_on_disk
from .conftest import fast_run, fast_sim
from .test_disk_space import run
from .test_downloads import manifest

MAX_OFFSET = 200

spans_st = st.lists(
    st.tuples(st.integers(0, MAX_OFFSET), st.integers(0, 40)),  # zero-length spans included on purpose
    max_size=12,
)


def model(spans: list[Span]) -> set[int]:
    return {b for offset, length in spans for b in range(offset, offset + length)}


def bytes_of(intervals: list[tuple[int, int]]) -> set[int]:
    return {b for start, end in intervals for b in range(start, end)}


def assert_sorted_disjoint_nonempty(intervals: list[tuple[int, int]], *, apart: bool) -> None:
    assert all(start < end for start, end in intervals), intervals
    for (_, end), (start, _) in itertools.pairwise(intervals):
        # merged joins touching intervals too (`apart`): one interval per run of proven bytes
        assert (end < start) if apart else (end <= start), intervals


@given(spans_st)
def test_merged_covers_exactly_the_bytes_written(spans: list[Span]) -> None:
    covered = merged(spans)
    assert bytes_of(covered) == model(spans)
    assert_sorted_disjoint_nonempty(covered, apart=True)


@given(spans_st, st.integers(0, MAX_OFFSET + 60))
def test_gaps_are_exactly_the_rest_of_the_file(spans: list[Span], size: int) -> None:
    covered = merged(spans)  # may reach past `size`: the gaps still stay within [0, size)
    holes = gaps(covered, size)
    assert bytes_of(holes) == set(range(size)) - model(spans)
    assert_sorted_disjoint_nonempty(holes, apart=False)


@given(spans_st)
def test_the_prefix_is_the_bytes_from_zero_without_a_hole(spans: list[Span]) -> None:
    proven = model(spans)
    expected = 0
    while expected in proven:
        expected += 1
    record = PartRecord(size=None, etag=None, spans=tuple(spans))
    assert record.prefix() == expected
    assert record.proven_bytes() == len(proven)


def test_examples_that_once_went_wrong() -> None:
    # A zero-length span among others: skipped, and the spans after it still count.
    assert merged([(0, 10), (12, 0), (20, 5)]) == [(0, 10), (20, 25)]
    assert merged([(7, 0)]) == []
    assert merged([(0, 1), (5, 1)]) == [(0, 1), (5, 6)]  # one-byte spans are proven bytes
    assert merged([(0, 5), (5, 5)]) == [(0, 10)]  # touching spans are one run
    # A hole before the first proven span, and after the last.
    assert gaps([(5, 10)], 20) == [(0, 5), (10, 20)]
    assert gaps([(0, 5), (10, 12)], 5) == []  # proven bytes past the end leave no empty gap behind
    assert PartRecord(size=20, etag=None, spans=((5, 5),)).prefix() == 0
    assert PartRecord(size=20, etag=None, spans=()).prefix() == 0


ODD_RANGE_BYTES = 300_001  # not a multiple of the hasher's read size: ranges end mid-read


@pytest.mark.anyio
async def test_ranges_of_any_size_give_the_right_file_and_sums(tmp_path: Path) -> None:
    """The hasher reads each range back from disk: it must stop at the range's end, whatever its size."""
    size = 3 * READ_BYTES + 13
    assert ODD_RANGE_BYTES % READ_BYTES and ODD_RANGE_BYTES < READ_BYTES
    settings = fast_run(settings={"range_bytes": ODD_RANGE_BYTES, "parallel_min_bytes": 1, "connections_per_file": 3})
    async with Simulator(fast_sim(checkpoint_bytes=size)) as sim:
        result = await run(sim, manifest(tmp_path, trainings=1, lora=False), tmp_path / "out", settings)
        assert result.outcome.exit_code == 0, result.outcome.problems
        assert_campaign_on_disk(sim, tmp_path / "out", "dl", ["t0"])
        ranged = [d for d in sim.ledger.downloads if d.status == 206]
    assert len(ranged) == -(-size // ODD_RANGE_BYTES)  # it did go by ranges of that size


def test_a_part_shorter_than_its_proven_range_is_an_error_that_says_where(tmp_path: Path) -> None:
    """Only if something else cut the `.part` under the download: the hasher must not hash less."""
    part = tmp_path / "a.part"
    part.write_bytes(b"12345")
    fd = os.open(part, os.O_RDONLY)
    try:
        with pytest.raises(DownloadError, match=r"^the part file ends at 5, before 10$"):
            _hash_range(fd, 0, 10, Hashes(md5=False))
    finally:
        os.close(fd)
