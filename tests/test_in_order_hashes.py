"""The hashes of a ranged download (`transfer/ranges.InOrderHashes`): blocks written to a real
part file in any order, on a real thread pool. The hashes are always of the whole file in order;
what arrives at the hashes' position is hashed as it comes, what arrives ahead is kept within the
budget, and only the rest is read back from the part."""

from __future__ import annotations

import hashlib
import os
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.transfer.ranges import InOrderHashes
from orchestrator.transfer.verify import StorageHashes

pytestmark = pytest.mark.anyio
BLOCK = 4096


async def hash_in_order(part: Path, data: bytes, order: list[int], ahead_bytes: int) -> InOrderHashes:
    """Write the blocks of `data` in `order` (block numbers), telling the hashes of each."""
    part.write_bytes(bytes(len(data)))  # noqa: ASYNC240 (a test's set-up)
    fd = os.open(part, os.O_RDWR)
    try:
        with ThreadPoolExecutor(2) as pool:
            hashes = InOrderHashes(fd, len(data), pool, ahead_bytes=ahead_bytes)
            hashes.start(StorageHashes(crc32c="AAAAAA=="))
            async with anyio.create_task_group() as tg:
                tg.start_soon(hashes.run)
                for n in order:
                    start = n * BLOCK
                    block = data[start : start + BLOCK]
                    os.pwrite(fd, block, start)
                    await hashes.arrived(start, memoryview(bytearray(block)))
                    hashes.written(start, start + len(block))
    finally:
        os.close(fd)
    return hashes


async def test_blocks_in_order_are_hashed_as_they_come_and_never_read_back(tmp_path: Path) -> None:
    data = random.Random(1).randbytes(10 * BLOCK + 123)
    hashes = await hash_in_order(tmp_path / "a.part", data, list(range(11)), ahead_bytes=0)
    assert hashes.hashes is not None and hashes.hashes.sha.hexdigest() == hashlib.sha256(data).hexdigest()
    assert hashes.read_back == 0


async def test_blocks_ahead_are_kept_within_the_budget_and_only_the_rest_read_back(tmp_path: Path) -> None:
    data = random.Random(2).randbytes(10 * BLOCK)
    reverse = list(range(9, -1, -1))  # block 0 last: every other block arrives ahead of the hashes
    kept_all = await hash_in_order(tmp_path / "a.part", data, reverse, ahead_bytes=9 * BLOCK)
    kept_three = await hash_in_order(tmp_path / "b.part", data, reverse, ahead_bytes=3 * BLOCK)
    kept_none = await hash_in_order(tmp_path / "c.part", data, reverse, ahead_bytes=0)
    for h in (kept_all, kept_three, kept_none):
        assert h.hashes is not None and h.hashes.sha.hexdigest() == hashlib.sha256(data).hexdigest()
    assert kept_all.read_back == 0
    assert kept_three.read_back == 6 * BLOCK  # blocks 9, 8, 7 kept; 6 to 1 read back
    assert kept_none.read_back == 9 * BLOCK  # only block 0 came at the hashes' position


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), blocks=st.integers(1, 12), tail=st.integers(0, BLOCK - 1), ahead=st.integers(0, 6))
def test_any_order_and_budget_gives_the_hashes_of_the_whole_file(
    tmp_path_factory: pytest.TempPathFactory, seed: int, blocks: int, tail: int, ahead: int
) -> None:
    rng = random.Random(seed)
    data = rng.randbytes(blocks * BLOCK + tail)
    order = list(range(blocks + (1 if tail else 0)))
    rng.shuffle(order)
    part = tmp_path_factory.mktemp("order") / "x.part"
    hashes = anyio.run(hash_in_order, part, data, order, ahead * BLOCK)
    assert hashes.hashes is not None and hashes.hashes.sha.hexdigest() == hashlib.sha256(data).hexdigest()
    assert hashes.hashes.size == len(data) and 0 <= hashes.read_back <= len(data)
