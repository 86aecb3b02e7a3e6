"""dreamlook-batch: run campaigns of paid dreamlook.ai jobs reliably.

The library surface: `Campaign` (built from a manifest or from jobs in memory, run in the
caller's event loop, its `Event`s followed as they happen, a `CampaignResult` at the end), the
settings (`RunSettings`, `Limits`, ...), `EVENTS` (every event and its fields), and the simulator
in `orchestrator.sim`. The command line (`orchestrator.cli`) is a client of `Campaign`.
"""

from __future__ import annotations

from .campaign import Campaign, CampaignResult, CampaignRun
from .commands import RunRequest, RunResult, paths_for, run_campaign
from .config import Limits, PollPolicy, RetryPolicy, RunSettings, Timeouts
from .errors import DreamlookBatchError, ManifestError
from .events import EVENTS, Event
from .manifest.load import Manifest, load_manifest
from .models import JobSpec, JobState, JobType
from .run.outcome import ExitCode, StopReason

__version__ = "0.1.0"
__all__ = [
    "EVENTS",
    "Campaign",
    "CampaignResult",
    "CampaignRun",
    "DreamlookBatchError",
    "Event",
    "ExitCode",
    "JobSpec",
    "JobState",
    "JobType",
    "Limits",
    "Manifest",
    "ManifestError",
    "PollPolicy",
    "RetryPolicy",
    "RunRequest",
    "RunResult",
    "RunSettings",
    "StopReason",
    "Timeouts",
    "load_manifest",
    "paths_for",
    "run_campaign",
]
