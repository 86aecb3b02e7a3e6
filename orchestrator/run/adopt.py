"""The service's tags are the truth: adoption of jobs a lost state forgot, and duplicates.

Adoption: before a job is submitted for the first time from a state that never saw it
(a new, deleted or mistyped state file; an emptied one is refused until it is removed),
the job list of its type is read once for the whole campaign, and a job already carrying our tag
(`dreamlook-batch` = `<campaign>/<job id>`) is taken as this job's: it is followed and
downloaded, not paid for again. Each job is looked for once (`adoption_checked`).

Duplicates: every job list a run reads goes through `TagWatch.seen`; two remote jobs
with one tag are recorded with all their ids, logged as `job.duplicate` and reported
by status, the summary and the exit code. The job keeps (and downloads) the one it
already holds, or the oldest listed; the others are listed for the user to fetch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..api.client import LIST_PAGE, ApiClient
from ..config import RunSettings
from ..events import event
from ..models import JobState, JobType
from ..store import Store
from .reconcile import read_list, shows_tags, tags_in

log = logging.getLogger(__name__)
# How far back adoption reads the job list (newest first): 200 pages of 50, the newest
# 10,000 jobs of a type. It stops sooner when the list ends or every job was found.
ADOPT_MAX_PAGES = 200


class TagWatch:
    """Looks at every job list the run reads for two remote jobs with one of our tags."""

    def __init__(self, store: Store, campaign: str) -> None:
        self.store, self.prefix = store, f"{campaign}/"

    async def seen(self, items: Sequence[Mapping[str, Any]]) -> None:
        ours = {tag[len(self.prefix) :]: ids for tag, ids in tags_in(items).items() if tag.startswith(self.prefix)}
        rows = {r.id: r for r in await self.store.jobs_by_id(ours)} if ours else {}  # one read for the page
        for job_id, ids in ours.items():
            row = rows.get(job_id)
            if row is None:
                continue  # a job of this campaign no longer in the state: nothing to mark
            # The job's own remote job may be off this page: any other id with its tag is a copy.
            kept = row.remote_id or ids[-1]  # ids[-1]: the oldest listed
            others = [i for i in reversed(ids) if i != kept]
            if others and await self.store.record_duplicates(job_id, others):
                event(log, "job.duplicate", job_id=job_id, state=row.state, remote_id=kept, duplicate_ids=others)


async def adopt(
    api: ApiClient,
    settings: RunSettings,
    store: Store,
    campaign: str,
    *,
    now: Callable[[], float],
    first_check: Callable[[str], float],
    watch: TagWatch,
) -> list[str]:
    """Adopt the jobs the service already holds under our tag; the warnings to show.

    Raises ApiError/TransportError when a job list cannot be read: the jobs it would
    have covered stay unchecked, and unchecked jobs are never submitted."""
    candidates = await store.adoption_candidates()
    warnings: list[str] = []
    adopted = 0
    for job_type in sorted({r.type for r in candidates}):
        rows = {f"{campaign}/{r.id}": r for r in candidates if r.type == job_type}
        missing = set(rows)

        def enough(page: Sequence[Mapping[str, Any]], missing: set[str] = missing) -> bool:
            missing.difference_update(tags_in(page))
            return not missing

        listing = await read_list(
            api, settings.retry, JobType(job_type), enough, max_pages=ADOPT_MAX_PAGES, what="adopt"
        )
        await watch.seen(listing.items)
        if listing.items and not shows_tags(listing.items):
            warnings.append(
                f"the {job_type} job list shows no tags: jobs of this campaign the service may already hold "
                "cannot be recognised (a lost or new state file pays for them again); keep the state file safe"
            )
        elif not listing.covered:
            warnings.append(
                f"looked for this campaign's {job_type} jobs among the newest {len(listing.items)} only "
                f"({ADOPT_MAX_PAGES} pages of {LIST_PAGE}); older ones would be paid for again"
            )
        by_tag = tags_in(listing.items)
        found = [(r.id, by_tag[tag][-1], first_check(r.type)) for tag, r in rows.items() if tag in by_tag]
        await store.adopt(found, [r.id for r in rows.values()], now())
        for job_id, remote_id, _ in found:
            event(log, "job.adopted", job_id=job_id, state=JobState.QUEUED, remote_id=remote_id)
        adopted += len(found)
    if candidates:
        event(log, "campaign.adopted", count=adopted, checked=len(candidates))
    for warning in warnings:
        event(log, "campaign.adoption_limited", reason=warning)
    return warnings
