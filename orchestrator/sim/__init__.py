"""A faithful, fault-injecting simulator of the dreamlook.ai API (see api-notes.md).

It shares no code with the client side: what it does must come from the API notes,
not from the client's assumptions.
"""

from __future__ import annotations

from .content import FileContent, expected_sha256
from .server import Simulator, serve
from .service import Ledger, LedgerEntry
from .settings import (
    DEFAULT_ADMIN_TOKEN,
    DEFAULT_TEST_KEY,
    FaultKind,
    FaultPlan,
    FaultRates,
    Route,
    ScriptedFault,
    SimSettings,
)

__all__ = [
    "DEFAULT_ADMIN_TOKEN",
    "DEFAULT_TEST_KEY",
    "FaultKind",
    "FaultPlan",
    "FaultRates",
    "FileContent",
    "Ledger",
    "LedgerEntry",
    "Route",
    "ScriptedFault",
    "SimSettings",
    "Simulator",
    "expected_sha256",
    "serve",
]
