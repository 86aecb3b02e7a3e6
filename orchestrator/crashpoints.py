"""Named places where tests kill the process, to prove that a restart recovers from there.

`DREAMLOOK_BATCH_CRASH_AT=<name>` makes the process SIGKILL itself on reaching the
point; `<name>:<n>` on reaching it the n-th time. Points: after-intent, after-post
(engine), span-proven (a downloaded span synced and recorded), before-rename (a verified
file not yet placed).
"""

from __future__ import annotations

import os
import signal
from collections import Counter

CRASH_ENV = "DREAMLOOK_BATCH_CRASH_AT"
_reached: Counter[str] = Counter()


def crash_point(name: str) -> None:
    wanted = os.environ.get(CRASH_ENV)
    if not wanted or not wanted.startswith(name):
        return
    point, _, nth = wanted.partition(":")
    if point != name:
        return
    _reached[name] += 1
    if not nth or _reached[name] == int(nth):
        os.kill(os.getpid(), signal.SIGKILL)
