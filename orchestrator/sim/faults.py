"""Which fault, if any, hits a request: by rate from a seeded generator, or by script.

The plan can be swapped while the simulator runs (tests switch faults mid-campaign);
a scripted fault's `nth` counts the requests since its plan was set.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, field

from .settings import FaultKind, FaultPlan, Route

API_ROUTES = (Route.SUBMIT, Route.GET, Route.LIST)


@dataclass
class _Bucket:
    tokens: float
    stamp: float


@dataclass
class FaultInjector:
    plan: FaultPlan
    seed: int
    rng: random.Random = field(init=False)
    seen: Counter[Route] = field(default_factory=Counter)
    buckets: dict[str, _Bucket] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rng = random.Random(f"faults/{self.seed}")

    def _scripted(self, route: Route) -> tuple[FaultKind, int | None] | None:
        nth = self.seen[route]
        for fault in self.plan.script:
            applies = fault.route is route or (fault.route is Route.ANY_API and route in API_ROUTES)
            if applies:
                count = self.seen[Route.ANY_API] if fault.route is Route.ANY_API else nth
                if fault.nth <= count < fault.nth + fault.count:
                    return fault.kind, fault.arg
        return None

    def replace_plan(self, plan: FaultPlan) -> None:
        self.plan = plan
        self.seen.clear()

    def pick(self, route: Route) -> tuple[FaultKind, int | None] | None:
        """The fault for this request; call once per request of `route`."""
        self.seen[route] += 1
        if route in API_ROUTES:
            self.seen[Route.ANY_API] += 1
        scripted = self._scripted(route)
        if scripted:
            return scripted
        r = self.plan.rates
        draw = self.rng.random
        if route in API_ROUTES:
            if draw() < r.server_error:
                return FaultKind.SERVER_ERROR, None
            if draw() < r.rate_limited:
                bare = draw() >= r.retry_after_share
                return (FaultKind.RATE_LIMITED_BARE if bare else FaultKind.RATE_LIMITED), None
            if draw() < r.slow:
                return FaultKind.SLOW, None
        if route is Route.SUBMIT:
            if draw() < r.ghost_submit:
                return FaultKind.GHOST, None
            if draw() < r.ghost_5xx:
                return FaultKind.GHOST_5XX, None
            if draw() < r.late_create:
                return FaultKind.LATE_CREATE, None
        if route is Route.DOWNLOAD:
            if draw() < r.reset_download:
                return FaultKind.RESET, None
            if draw() < r.truncate_download:
                return FaultKind.TRUNCATE, None
            if draw() < r.ignore_range:
                return FaultKind.IGNORE_RANGE, None
            if draw() < r.rewrite:
                return FaultKind.REWRITE, None
        return None

    def throttle(self, key: str, now: float) -> float | None:
        """Seconds to wait when `key` is over the requests-per-second limit, else None."""
        rps = self.plan.requests_per_s
        if rps is None:
            return None
        bucket = self.buckets.setdefault(key, _Bucket(tokens=rps, stamp=now))
        bucket.tokens = min(rps, bucket.tokens + (now - bucket.stamp) * rps)
        bucket.stamp = now
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return None
        return max(1.0, math.ceil((1 - bucket.tokens) / rps))
