"""`python -m orchestrator` is the `dreamlook-batch` command."""

from __future__ import annotations

import sys

from .cli import main

sys.exit(main())
