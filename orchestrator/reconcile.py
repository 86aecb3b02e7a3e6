"""Rule 2: a submission whose answer was lost is never simply sent again.

We look for the job in the API's list of jobs of its type: first by our tag
(`dreamlook-batch` = `<campaign>/<job id>`), then by a config that matches what we
sent and that no other job of the campaign has claimed. Found: it is ours. Absent
from a listing that provably covers the time since the intent: it was never made,
and may be sent again. Anything else is `unknown`, for a person to settle.
"""

from __future__ import annotations

import enum
import json
import logging
from collections.abc import Mapping, Set
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
MAX_PAGES = 20
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


def _created_at(item: Mapping[str, Any]) -> float | None:
    return parse_time(item.get("state_queued_start") or item.get("created_at"))


def _config_matches(sent: Mapping[str, Any], config: Any) -> bool:
    if not isinstance(config, Mapping):
        return False
    return all(config.get(k) == v for k, v in sent.items() if k not in NOT_SENT_KEYS)


async def reconcile(
    api: ApiClient,
    policy: RetryPolicy,
    *,
    job_type: JobType,
    tag_value: str,
    sent_payload: str,
    intent_at: float,
    claimed: Set[str],
) -> Reconciled:
    sent = json.loads(sent_payload)
    by_config: list[str] = []
    covered = False
    seen = 0
    try:
        for page in range(MAX_PAGES):
            offset = page * PAGE

            async def list_page(offset: int = offset) -> list[dict[str, Any]]:
                return await api.list_jobs(job_type, limit=PAGE, offset=offset)

            items = await idempotent(list_page, policy, "reconcile")
            for item in items:
                seen += 1
                remote_id = str(item.get("job_id", ""))
                tags = item.get("tags") or []
                if any(
                    isinstance(t, Mapping) and t.get("key") == CAMPAIGN_TAG_KEY and t.get("value") == tag_value
                    for t in tags
                ):
                    return Reconciled(Verdict.FOUND, remote_id, "found by its tag in the job list")
                if remote_id not in claimed and _config_matches(sent, item.get("config")):
                    by_config.append(remote_id)
                created = _created_at(item)
                if created is not None and created < intent_at - CLOCK_SKEW_S:
                    covered = True
            if covered or len(items) < PAGE:
                covered = True
                break
    except (ApiError, TransportError) as exc:
        return Reconciled(Verdict.UNKNOWN, None, f"could not read the job list to check ({exc})")
    if len(by_config) == 1:
        return Reconciled(Verdict.FOUND, by_config[0], "found by its config in the job list (the list shows no tags)")
    if len(by_config) > 1:
        ids = ", ".join(by_config[:5])
        return Reconciled(
            Verdict.UNKNOWN,
            None,
            f"several listed jobs match its config ({ids}); which one is ours is unclear",
        )
    if covered:
        return Reconciled(Verdict.ABSENT, None, f"absent from the job list ({seen} jobs back to before the attempt)")
    return Reconciled(
        Verdict.UNKNOWN,
        None,
        f"not among the newest {seen} jobs, and the list does not reach back to the attempt",
    )
