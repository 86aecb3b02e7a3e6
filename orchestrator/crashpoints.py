"""Named places where tests kill the process, to prove that a restart recovers from there.

`DREAMLOOK_BATCH_CRASH_AT=<name>` makes the process SIGKILL itself on reaching the
point; `<name>:<n>` on reaching it the n-th time. `DREAMLOOK_BATCH_FREEZE_AT` the same
with SIGSTOP: the process stands still (as one swapped out, or cut off, would) until
the test sends SIGCONT. Points: after-intent, after-post (engine), span-proven (a
downloaded span synced and recorded), before-rename (a verified file not yet placed),
part-uploaded (a part of a bucket upload in the bucket and recorded).

`DREAMLOOK_BATCH_UNSAFE_NO_LEASE_CHECK=1` switches off the lease check before a POST in a
shared campaign: the negative control of the chaos tests, which must then find duplicates.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

CRASH_ENV = "DREAMLOOK_BATCH_CRASH_AT"
FREEZE_ENV = "DREAMLOOK_BATCH_FREEZE_AT"
NO_LEASE_CHECK_ENV = "DREAMLOOK_BATCH_UNSAFE_NO_LEASE_CHECK"
_reached: Counter[tuple[str, str]] = Counter()


def crash_point(name: str) -> None:
    for env, sig in ((CRASH_ENV, signal.SIGKILL), (FREEZE_ENV, signal.SIGSTOP)):
        wanted = os.environ.get(env)
        if not wanted or not wanted.startswith(name):
            continue
        point, _, nth = wanted.partition(":")
        if point != name:
            continue
        _reached[env, name] += 1
        if not nth or _reached[env, name] == int(nth):
            os.kill(os.getpid(), sig)


def lease_check_off() -> bool:
    return os.environ.get(NO_LEASE_CHECK_ENV) == "1"
