"""dreamlook-batch: run campaigns of paid dreamlook.ai jobs reliably.

The library surface: `load_manifest`, `RunRequest`/`run_campaign`, and the simulator
in `orchestrator.sim`. The command line is `orchestrator.cli`.
"""

from __future__ import annotations

from .commands import RunRequest, RunResult, paths_for, run_campaign
from .config import Limits, PollPolicy, RetryPolicy, RunSettings, Timeouts
from .manifest.load import Manifest, load_manifest

__version__ = "0.1.0"
__all__ = [
    "Limits",
    "Manifest",
    "PollPolicy",
    "RetryPolicy",
    "RunRequest",
    "RunResult",
    "RunSettings",
    "Timeouts",
    "load_manifest",
    "paths_for",
    "run_campaign",
]
