"""Each check between storage and a final file name, alone against the fault it exists for.

Every test here leaves exactly one guard between a faulty object and a wrong file on
disk: the faults are chosen so that no other check can catch them (a consistent object
of the wrong size; a header broken in a consistent object; only an md5, or only a crc32c
(a composite object), from storage; no hash at all where the ETag is the guard). Files are
3 MiB, above the 1 MiB from which a part is recorded, and go in one stream or in 1 MiB
ranges, so every path runs.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from orchestrator.api.retry import range_tries_per_run
from orchestrator.config import FILE_RETRY, RANGE_RETRY, RunSettings
from orchestrator.sim import FaultKind, FaultPlan, Route, ScriptedFault, Simulator

from .campaigns import assert_campaign_on_disk
from .conftest import fast_run, fast_sim
from .test_downloads import manifest, run

pytestmark = pytest.mark.anyio
MiB = 1024 * 1024
SIZE = 3 * MiB + 13
ONE_STREAM = {"parallel_min_bytes": 1 << 40, "range_bytes": MiB}
RANGES = {"parallel_min_bytes": MiB, "range_bytes": MiB, "connections_per_file": 4}
PATHS = [pytest.param(ONE_STREAM, id="one-stream"), pytest.param(RANGES, id="ranges")]


def settings(path: dict[str, int], **more: int) -> RunSettings:
    return fast_run(settings={**path, **more})


def scripted(*faults: tuple[FaultKind, int, int | None]) -> FaultPlan:
    return FaultPlan(script=tuple(ScriptedFault(route=Route.DOWNLOAD, kind=k, nth=n, arg=a) for k, n, a in faults))


def placed(out: Path) -> list[str]:
    return sorted(p.name for p in out.rglob("*.safetensors*"))


async def test_an_object_shorter_than_the_job_says_is_never_placed(tmp_path: Path) -> None:
    """Only the size check: the object is a whole, consistent safetensors file with its own md5."""
    plan = scripted((FaultKind.REWRITE, 1, -4096))
    async with Simulator(fast_sim(checkpoint_bytes=SIZE, faults=plan)) as sim:
        result = await run(sim, manifest(tmp_path, trainings=1, lora=False), settings(ONE_STREAM, download_rounds=1))
        assert sim.service.resized  # storage really holds fewer bytes than the job says
    assert result.outcome.exit_code == 1
    assert any(f"of {SIZE} bytes" in p for p in result.outcome.problems), result.outcome.problems
    assert [n for n in placed(result.paths.out) if not n.endswith(".part")] == []


@pytest.mark.parametrize("path", PATHS)
async def test_a_broken_safetensors_header_is_never_placed(tmp_path: Path, path: dict[str, int]) -> None:
    """Only the header check: right size, and storage's md5 is of the broken object itself."""
    plan = scripted((FaultKind.CORRUPT_HEADER, 1, None))
    async with Simulator(fast_sim(checkpoint_bytes=SIZE, faults=plan)) as sim:
        result = await run(sim, manifest(tmp_path, trainings=1, lora=False), settings(path, download_rounds=1))
        assert sim.service.corrupt
    assert result.outcome.exit_code == 1
    assert any("safetensors header" in p for p in result.outcome.problems), result.outcome.problems
    assert placed(result.paths.out) == []  # neither a final file nor a part of wrong bytes


@pytest.mark.parametrize(
    "path, hashes",
    [
        pytest.param(ONE_STREAM, {"crc32c": False}, id="one-stream-md5"),
        pytest.param(RANGES, {"crc32c": False}, id="ranges-md5"),
        # A composite object: storage gives its crc32c and no md5.
        pytest.param(ONE_STREAM, {"hash_max_bytes": 0}, id="one-stream-crc32c"),
        pytest.param(RANGES, {"hash_max_bytes": 0}, id="ranges-crc32c"),
    ],
)
async def test_wrong_bytes_of_the_right_length_are_fetched_again(
    tmp_path: Path, path: dict[str, int], hashes: dict[str, int]
) -> None:
    """Only storage's md5, or only its crc32c: a body of the right length whose second half is wrong."""
    plan = scripted((FaultKind.GARBLE, 1, 100_000))
    async with Simulator(fast_sim(checkpoint_bytes=SIZE, faults=plan, **hashes)) as sim:
        result = await run(sim, manifest(tmp_path, trainings=1, lora=False), settings(path))
        assert result.outcome.exit_code == 0, result.outcome.problems
        assert [d.fault for d in sim.ledger.downloads].count("garble") == 1
        assert_campaign_on_disk(sim, result.paths.out, "dl", ["t0"])


async def test_an_object_rewritten_under_a_resumed_part_is_fetched_again_whole(tmp_path: Path) -> None:
    """Only the ETag, in one stream: storage gives no md5, and the new generation has the same size."""
    plan = scripted((FaultKind.RESET, 1, 1_500_000), (FaultKind.REWRITE, 2, None))
    async with Simulator(fast_sim(checkpoint_bytes=SIZE, hash_max_bytes=0, crc32c=False, faults=plan)) as sim:
        result = await run(sim, manifest(tmp_path, trainings=1, lora=False), settings(ONE_STREAM))
        assert result.outcome.exit_code == 0, result.outcome.problems
        served = [(d.start, d.status, d.fault) for d in sim.ledger.downloads]
        assert_campaign_on_disk(sim, result.paths.out, "dl", ["t0"])  # the new generation's bytes
    # broken mid-way; the resume from the proven prefix meets a new ETag; the whole file again
    assert [(s > 0, status, fault) for s, status, fault in served] == [
        (False, 200, "reset"),
        (True, 206, "rewrite"),
        (False, 200, None),
    ]


async def test_an_object_rewritten_between_ranges_is_fetched_again_whole(tmp_path: Path) -> None:
    """Only the ETag, in ranges: the first range comes from one generation, the others from the next."""
    plan = scripted((FaultKind.REWRITE, 2, None))
    async with Simulator(fast_sim(checkpoint_bytes=SIZE, hash_max_bytes=0, crc32c=False, faults=plan)) as sim:
        result = await run(sim, manifest(tmp_path, trainings=1, lora=False), settings(RANGES))
        assert result.outcome.exit_code == 0, result.outcome.problems
        served = [(d.start, d.fault) for d in sim.ledger.downloads]
        assert_campaign_on_disk(sim, result.paths.out, "dl", ["t0"])
    assert [f for _, f in served].count("rewrite") == 1
    assert [s for s, _ in served].count(0) == 2  # started over: the first range again, from the new generation


@pytest.mark.parametrize("path", PATHS)
async def test_a_file_that_keeps_failing_is_tried_exactly_as_the_policies_say(
    tmp_path: Path, path: dict[str, int]
) -> None:
    """Rounds x file attempts x range attempts, stated once in api/retry.py, and no more requests."""
    plan = FaultPlan(script=(ScriptedFault(route=Route.DOWNLOAD, kind=FaultKind.SERVER_ERROR, count=10_000),))
    one_range = {**path, "range_bytes": 8 * MiB}  # the ranged path fetches the file as one range
    run_settings = replace(
        settings(one_range, download_rounds=2),
        file_retry=replace(FILE_RETRY, attempts=2, backoff_min_s=0.001, backoff_max_s=0.001),
        range_retry=replace(RANGE_RETRY, attempts=3, backoff_min_s=0.001, backoff_max_s=0.001),
    )
    async with Simulator(fast_sim(checkpoint_bytes=SIZE, faults=plan)) as sim:
        result = await run(sim, manifest(tmp_path, trainings=1, lora=False), run_settings)
        tried = sim.ledger.requests[Route.DOWNLOAD]
    ranged = path is RANGES
    assert tried == (range_tries_per_run(run_settings) if ranged else 2 * 2) == (12 if ranged else 4)
    assert result.outcome.exit_code == 1
    assert any("gave up after 2 attempts" in p for p in result.outcome.problems), result.outcome.problems
    assert [n for n in placed(result.paths.out) if not n.endswith(".part")] == []
