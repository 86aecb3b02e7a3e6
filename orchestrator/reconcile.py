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
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass
from typing import Any

from .api import ApiClient
from .config import RetryPolicy
from .errors import ApiError, TransportError
from .manifest import CAMPAIGN_TAG_KEY
from .models import JobType
from .results import parse_time
from .retry import idempotent

log = logging.getLogger(__name__)
CLOCK_SKEW_S = 300.0  # our clock and the API's may differ this much
PAGE = 50  # the API's default page size
MAX_PAGES = 40
NOT_SENT_KEYS = frozenset({"tags", "callback", "dry_run"})


class Verdict(enum.Enum):
    FOUND = "found"
    ABSENT = "absent"  # provably never created: safe to send again
    UNKNOWN = "unknown"


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


async def reconcile(
    api: ApiClient, policy: RetryPolicy, job_type: JobType, lost: Sequence[Lost], claimed: Set[str]
) -> dict[str, Reconciled]:
    """A verdict for each lost submission of `job_type`, from one reading of the job list."""
    oldest_intent = min(item.intent_at for item in lost)
    listed: list[Mapping[str, Any]] = []
    covered = False
    try:
        for page in range(MAX_PAGES):

            async def list_page(offset: int = page * PAGE) -> list[dict[str, Any]]:
                return await api.list_jobs(job_type, limit=PAGE, offset=offset)

            items = await idempotent(list_page, policy, "reconcile")
            listed += items
            created = [parse_time(i.get("state_queued_start") or i.get("created_at")) for i in items]
            if len(items) < PAGE or any(c is not None and c < oldest_intent - CLOCK_SKEW_S for c in created):
                covered = True
                break
    except (ApiError, TransportError) as exc:
        why = f"could not read the job list to check ({exc})"
        return {item.job_id: Reconciled(Verdict.UNKNOWN, None, why) for item in lost}
    by_tag: dict[str, list[str]] = {}
    for item in listed:
        tag = _tag_of(item)
        if tag is not None:
            by_tag.setdefault(tag, []).append(str(item.get("job_id", "")))
    verdicts: dict[str, Reconciled] = {}
    taken = set(claimed)
    for job in lost:
        tagged = by_tag.get(job.tag_value, [])
        if tagged:
            remote = tagged[-1]  # the list is newest first: the oldest is ours, later ones duplicates
            if len(tagged) > 1:
                log.error("job.duplicate job_id=%s remote_ids=%s", job.job_id, ",".join(tagged))
            verdicts[job.job_id] = Reconciled(Verdict.FOUND, remote, "found by its tag in the job list")
            taken.add(remote)
    # Where the list shows tags, a job without ours is not ours: config matching could only
    # claim somebody else's job with the same settings.
    tags_listed = any("tags" in item for item in listed)
    for job in lost:
        if job.job_id in verdicts:
            continue
        sent = json.loads(job.sent_payload)
        if tags_listed:
            why = f"absent from the job list ({len(listed)} jobs, back to before the attempt)"
            verdicts[job.job_id] = (
                Reconciled(Verdict.ABSENT, None, why) if covered else Reconciled(Verdict.UNKNOWN, None, why)
            )
            continue
        matches = [
            str(i.get("job_id", ""))
            for i in listed
            if str(i.get("job_id", "")) not in taken and _tag_of(i) is None and _config_matches(sent, i.get("config"))
        ]
        if len(matches) == 1:
            verdicts[job.job_id] = Reconciled(Verdict.FOUND, matches[0], "found by its config (the list shows no tags)")
            taken.add(matches[0])
        elif matches:
            ids = ", ".join(matches[:5])
            why = f"several listed jobs match its config ({ids}); which one is ours is unclear"
            verdicts[job.job_id] = Reconciled(Verdict.UNKNOWN, None, why)
        elif covered:
            why = f"absent from the job list ({len(listed)} jobs, back to before the attempt)"
            verdicts[job.job_id] = Reconciled(Verdict.ABSENT, None, why)
        else:
            why = f"not among the newest {len(listed)} jobs, and the list does not reach back to the attempt"
            verdicts[job.job_id] = Reconciled(Verdict.UNKNOWN, None, why)
    return verdicts
