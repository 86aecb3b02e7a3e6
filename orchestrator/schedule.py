"""When to look at a job next: the one place that turns what we know into a wait.

Queued jobs back off from `queued_s`; running jobs are checked near their predicted
end (from `percentage_done` and `running_duration`); without an estimate, a jittered
exponential backoff from `min_s`. Always within [min_s, max_s].
"""

from __future__ import annotations

import random

from .config import PollPolicy
from .models import RemoteJob, RemoteState

FINISH_EARLY_SHARE = 0.9  # check a little before the predicted end


def next_check_in(policy: PollPolicy, remote: RemoteJob | None, checks: int) -> float:
    """Seconds until the next GET of a job that has not ended."""
    if remote is not None and remote.state is RemoteState.RUNNING:
        pct, ran = remote.percentage_done, remote.running_duration_s
        if pct and ran and 0 < pct < 100:
            wait = ran * (100 - pct) / pct * FINISH_EARLY_SHARE
        else:
            wait = policy.min_s * policy.backoff ** min(checks, 30)
    else:
        wait = policy.queued_s * policy.backoff ** min(checks, 30)
    wait *= 1 + random.uniform(-policy.jitter, policy.jitter)
    return min(policy.max_s, max(policy.min_s, wait))
