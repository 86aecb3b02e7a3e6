"""The command line's numeric option types: a number that makes no sense is a usage error.

One argparse type for every number option, so `--submit-rate nan`, `--max-active 0` or
`jobs list --limit -1` stop with exit 2 and a message naming the option before anything
runs or is sent (argparse's own error path), instead of a run paced by NaN.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from .api.callbacks import parse_listen
from .errors import UsageError


@dataclass(frozen=True, slots=True, kw_only=True)
class Number:
    """A finite int or float of at least `low` (more than `low` with `open_low`), at most `high`."""

    kind: type[int] | type[float]
    low: float | None = None
    open_low: bool = False
    high: float | None = None

    def __call__(self, text: str) -> float:
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {self._noun()}; give {self._span()}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number; give {self._span()}")
        wrong = (self.low is not None and (value < self.low or (self.open_low and value == self.low))) or (
            self.high is not None and value > self.high
        )
        if wrong:
            raise argparse.ArgumentTypeError(f"{text!r}: give {self._span()}")
        return value

    def _noun(self) -> str:
        return "a whole number" if self.kind is int else "a number"

    def _span(self) -> str:
        noun = self._noun()
        if self.low is not None and self.high is not None:
            return f"{noun} from {self.low:g} to {self.high:g}"
        if self.low is not None:
            return f"{noun} {'above' if self.open_low else 'of at least'} {self.low:g}"
        return noun


COUNT = Number(kind=int, low=1)  # jobs, files, connections, list entries: at least one
ALLOWANCE = Number(kind=int, low=0)  # a budget that may be 0 (`--max-new-jobs 0`: submit nothing)
WHOLE = Number(kind=int)  # any integer (a seed)
PORT = Number(kind=int, low=0, high=65535)  # 0: any free port
POSITIVE = Number(kind=float, low=0, open_low=True)  # rates, timeouts, time scales, sizes
NON_NEGATIVE = Number(kind=float, low=0)  # a grace or threshold that may be 0
SHARE = Number(kind=float, low=0, high=1)  # a fault or failure rate


def host_port(text: str) -> str:
    """`--listen HOST:PORT`, checked before anything runs (the run itself parses it again)."""
    try:
        parse_listen(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix(f"--listen {text!r}: ")) from None
    return text
