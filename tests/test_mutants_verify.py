"""What `verify.place` lets stand under a final name: safetensors headers at the edges of what
is possible, and the permissions of the placed file. Real files under tmp_path, checked
through `place` as the downloads do."""

from __future__ import annotations

import json
import os
import stat
import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anyio
import pytest

from orchestrator.errors import VerificationFailed
from orchestrator.transfer import verify
from orchestrator.transfer.verify import Hashes, StorageHashes, check_safetensors_head


def write_part(folder: Path, data: bytes) -> tuple[Path, Path, Hashes]:
    """`data` written into `model.safetensors.part` (with its hashes, as a download takes them)."""
    part, final = folder / "model.safetensors.part", folder / "model.safetensors"
    part.write_bytes(data)
    hashes = Hashes(md5=False)
    hashes.update(data)
    return part, final, hashes


def place(part: Path, final: Path, hashes: Hashes, *, size_bytes: int) -> None:
    """`verify.place` as a download calls it, on a pool of its own."""

    async def placing() -> None:
        with ThreadPoolExecutor(1) as pool:
            await verify.place(part, final, hashes, size_bytes=size_bytes, expected=StorageHashes(), pool=pool)

    anyio.run(placing)


def placed(folder: Path, data: bytes) -> bool:
    """Whether `place` puts these bytes under the final name (a refused part is deleted)."""
    folder = folder / str(len(list(folder.iterdir())))  # a folder of its own for each file
    folder.mkdir()
    part, final, writer = write_part(folder, data)
    try:
        place(part, final, writer, size_bytes=len(data))
    except VerificationFailed:
        assert not part.exists() and not final.exists()
        return False
    assert final.read_bytes() == data and not part.exists()
    return True


def safetensors(header: bytes, body: bytes = b"", *, length: int | None = None) -> bytes:
    return struct.pack("<Q", len(header) if length is None else length) + header + body


def test_a_safetensors_file_of_empty_tensors_only_is_placed(tmp_path: Path) -> None:
    """The header runs to the last byte of the file: a header length of exactly size - 8 is possible."""
    header = json.dumps({"empty": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}).encode()
    assert placed(tmp_path, safetensors(header))
    assert placed(tmp_path, safetensors(b"{}"))  # no tensor at all


def test_a_header_length_beyond_the_end_of_the_file_is_refused(tmp_path: Path) -> None:
    """The length claims one byte more than the file holds, though what is there parses."""
    assert not placed(tmp_path, safetensors(b"{}", length=3))
    assert not placed(tmp_path, safetensors(b"{}", length=10))
    part, final, writer = write_part(tmp_path, safetensors(b"{}", length=10))
    with pytest.raises(VerificationFailed, match="safetensors header length 10 is impossible"):
        place(part, final, writer, size_bytes=10)


def test_the_first_part_of_a_good_file_passes_and_one_too_short_for_its_header_is_said_so() -> None:
    """A bucket upload checks the header on the first part: the tensor bytes after the header
    are not part of it; a header longer than the part is refused as such, not as bad JSON."""
    header = json.dumps({"w": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}}).encode()
    whole = safetensors(header, b"abcd")
    check_safetensors_head("m.safetensors", whole, len(whole))
    check_safetensors_head("m.safetensors", whole[: 8 + len(header) + 1], len(whole))
    check_safetensors_head("m.safetensors", whole[: 8 + len(header)], len(whole))  # the header to its last byte
    with pytest.raises(VerificationFailed, match="does not fit in its first part"):
        check_safetensors_head("m.safetensors", whole[: 8 + len(header) - 1], len(whole))


def test_a_header_length_with_its_top_bit_set_is_refused(tmp_path: Path) -> None:
    """An unsigned 64-bit length: 2**63 and above are impossible, never a negative number."""
    assert not placed(tmp_path, b"\xff" * 8 + b"{}")
    assert not placed(tmp_path, safetensors(b"{}", length=2**63 + 2))


def test_tensors_that_end_before_the_file_does_are_refused(tmp_path: Path) -> None:
    header = json.dumps({"w": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}}).encode()
    assert placed(tmp_path, safetensors(header, b"abcd"))
    assert not placed(tmp_path, safetensors(header, b"abcdefgh"))
    part, final, writer = write_part(tmp_path, safetensors(header, b"abcdefgh"))
    with pytest.raises(VerificationFailed, match=f"tensors end at {8 + len(header) + 4}, the file has"):
        place(part, final, writer, size_bytes=8 + len(header) + 8)


@pytest.fixture
def usual_umask() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.usefixtures("usual_umask")
def test_a_placed_file_is_readable_and_not_executable(tmp_path: Path) -> None:
    part, final, writer = write_part(tmp_path, safetensors(b"{}"))
    place(part, final, writer, size_bytes=10)
    assert stat.S_IMODE(final.stat().st_mode) == 0o644
