"""Named places where tests kill the process, to prove that a restart recovers from there.

`DREAMLOOK_BATCH_CRASH_AT=<name>` makes the process SIGKILL itself on reaching the
point: after-intent, after-post (engine), before-rename (a verified file not yet placed).
"""

from __future__ import annotations

import os
import signal

CRASH_ENV = "DREAMLOOK_BATCH_CRASH_AT"


def crash_point(name: str) -> None:
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
