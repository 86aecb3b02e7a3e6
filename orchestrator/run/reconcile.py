"""Rule 2: a submission whose answer was lost is never simply sent again.

We look for each such job in the API's list of jobs of its type (read once for all
of them): first by our tag (`dreamlook-batch` = `<campaign>/<job id>`), then by a
config that matches what we sent and that no other job of the campaign has claimed.
Found: it is ours. Absent from a listing that provably covers the time since the
intent: it was never made, and may be sent again. Anything else is `unknown`, for a
person to settle.
"""

from __future__ import annotations

import enum
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence, Set
from dataclasses import dataclass
from typing import Any

from ..api.client import LIST_PAGE, ApiClient
from ..api.jobs import parse_time
from ..api.retry import idempotent
from ..config import RetryPolicy
from ..errors import ApiError, TransportError
from ..manifest.load import CAMPAIGN_TAG_KEY
from ..models import JobType

log = logging.getLogger(__name__)
CLOCK_SKEW_S = 300.0  # our clock and the API's may differ this much
MAX_PAGES = 40
NOT_SENT_KEYS = frozenset({"tags", "callback", "dry_run"})


class Verdict(enum.Enum):
    FOUND = "found"
    ABSENT = "absent"  # provably never created: safe to send again
    UNKNOWN = "unknown"
    UNREAD = "unread"  # the job list could not be read: nothing is known yet, look again later


@dataclass(frozen=True, slots=True)
class Reconciled:
    verdict: Verdict
    remote_id: str | None
    why: str


@dataclass(frozen=True, slots=True)
class Lost:
    """A submission whose outcome is unknown: what we sent, and when we meant to."""

    job_id: str
    tag_value: str
    sent_payload: str
    intent_at: float


def _config_matches(sent: Mapping[str, Any], config: Any) -> bool:
    if not isinstance(config, Mapping):
        return False
    return all(config.get(k) == v for k, v in sent.items() if k not in NOT_SENT_KEYS)


def _tag_of(item: Mapping[str, Any]) -> str | None:
    for tag in item.get("tags") or []:
        if isinstance(tag, Mapping) and tag.get("key") == CAMPAIGN_TAG_KEY and isinstance(tag.get("value"), str):
            return str(tag["value"])
    return None


@dataclass(frozen=True, slots=True)
class Listing:
    items: list[Mapping[str, Any]]  # newest first
    complete: bool  # the list ended: nothing older exists
    enough: bool  # the caller's `enough` said stop

    @property
    def covered(self) -> bool:
        return self.complete or self.enough


async def read_list(
    api: ApiClient,
    policy: RetryPolicy,
    job_type: JobType,
    enough: Callable[[Sequence[Mapping[str, Any]]], bool],
    *,
    max_pages: int = MAX_PAGES,
    what: str = "reconcile",
) -> Listing:
    """Pages of the job list, newest first, until a short page, `enough(page)` or `max_pages`.

    Paging by `limit`/`offset` is what the docs suggest, not a documented contract; a
    service that ignores `offset` repeats its first page: we stop there, not covered."""
    listed: list[Mapping[str, Any]] = []
    seen_ids: set[str] = set()
    for page in range(max_pages):

        async def list_page(offset: int = page * LIST_PAGE) -> list[dict[str, Any]]:
            return await api.list_jobs(job_type, limit=LIST_PAGE, offset=offset)

        items = await idempotent(list_page, policy, what)
        fresh = [i for i in items if str(i.get("job_id", "")) not in seen_ids]
        seen_ids.update(str(i.get("job_id", "")) for i in fresh)
        listed += fresh
        if enough(fresh):
            return Listing(listed, complete=False, enough=True)
        if len(items) < LIST_PAGE:
            return Listing(listed, complete=True, enough=False)
        if not fresh:  # a full page seen before: `offset` is ignored, older jobs cannot be reached
            return Listing(listed, complete=False, enough=False)
    return Listing(listed, complete=False, enough=False)


def reaches_back(since: float) -> Callable[[Sequence[Mapping[str, Any]]], bool]:
    """`enough` for a listing that must cover everything created since `since`."""

    def enough(page: Sequence[Mapping[str, Any]]) -> bool:
        created = [parse_time(i.get("state_queued_start") or i.get("created_at")) for i in page]
        return any(c is not None and c < since - CLOCK_SKEW_S for c in created)

    return enough


def tags_in(items: Iterable[Mapping[str, Any]]) -> dict[str, list[str]]:
    """Our tag's value -> the remote ids carrying it, in listing order (newest first)."""
    by_tag: dict[str, list[str]] = {}
    for item in items:
        tag = _tag_of(item)
        if tag is not None:
            by_tag.setdefault(tag, []).append(str(item.get("job_id", "")))
    return by_tag


def shows_tags(items: Sequence[Mapping[str, Any]]) -> bool:
    """Does this API's list echo tags at all? (Some listings leave them out.)"""
    return any("tags" in item for item in items)


async def reconcile(
    api: ApiClient,
    policy: RetryPolicy,
    job_type: JobType,
    lost: Sequence[Lost],
    claimed: Set[str],
    seen: Callable[[Sequence[Mapping[str, Any]]], Awaitable[None]] | None = None,
) -> dict[str, Reconciled]:
    """A verdict for each lost submission of `job_type`, from one reading of the job list."""
    oldest_intent = min(item.intent_at for item in lost)
    try:
        listing = await read_list(api, policy, job_type, reaches_back(oldest_intent))
    except (ApiError, TransportError) as exc:
        why = f"could not read the job list to check ({exc})"
        return {item.job_id: Reconciled(Verdict.UNREAD, None, why) for item in lost}
    listed, covered = listing.items, listing.covered
    if seen is not None:
        await seen(listed)
    verdicts, taken = _by_tag(lost, listed, claimed)
    # Where the list shows tags, a job without ours is not ours: config matching could only
    # claim somebody else's job with the same settings.
    tags_listed = shows_tags(listed)
    for job in lost:
        if job.job_id in verdicts:
            continue
        if tags_listed:
            verdicts[job.job_id] = _absent(len(listed)) if covered else _not_reached(len(listed))
            continue
        verdicts[job.job_id] = _by_config(job, listed, taken, covered)
    return verdicts


def _by_tag(
    lost: Sequence[Lost], listed: Sequence[Mapping[str, Any]], claimed: Set[str]
) -> tuple[dict[str, Reconciled], set[str]]:
    """The lost jobs whose tag is listed, and every remote id now taken."""
    by_tag = tags_in(listed)
    verdicts: dict[str, Reconciled] = {}
    taken = set(claimed)
    for job in lost:
        tagged = by_tag.get(job.tag_value, [])
        if tagged:
            remote = tagged[-1]  # the list is newest first: the oldest is ours, later ones duplicates
            verdicts[job.job_id] = Reconciled(Verdict.FOUND, remote, "found by its tag in the job list")
            taken.add(remote)
    return verdicts, taken


def _by_config(job: Lost, listed: Sequence[Mapping[str, Any]], taken: set[str], covered: bool) -> Reconciled:
    """A list without tags: one untaken untagged job with the sent config is ours (and now taken)."""
    sent = json.loads(job.sent_payload)
    matches = [
        str(i.get("job_id", ""))
        for i in listed
        if str(i.get("job_id", "")) not in taken and _tag_of(i) is None and _config_matches(sent, i.get("config"))
    ]
    if len(matches) == 1:
        taken.add(matches[0])
        return Reconciled(Verdict.FOUND, matches[0], "found by its config (the list shows no tags)")
    if matches:
        ids = ", ".join(matches[:5])
        why = f"several listed jobs match its config ({ids}); which one is ours is unclear"
        return Reconciled(Verdict.UNKNOWN, None, why)
    return _absent(len(listed)) if covered else _not_reached(len(listed))


def _absent(listed: int) -> Reconciled:
    return Reconciled(Verdict.ABSENT, None, f"absent from the job list ({listed} jobs, back to before the attempt)")


def _not_reached(listed: int) -> Reconciled:
    why = f"not among the newest {listed} jobs, and the list does not reach back to the attempt"
    return Reconciled(Verdict.UNKNOWN, None, why)
