"""`make mutants`: mutation testing of the modules that guard money and files.

mutmut (configured under `[tool.mutmut]` in pyproject.toml) mutates the guarded
modules and runs, for each mutant, only the tests that cover the mutated function.
Then every survivor must be answered in `bench/MUTANTS.md`: either a test kills it,
or one line says why it cannot matter. This script runs mutmut, prints the score
per module, and lists the survivors that MUTANTS.md does not answer yet (exit 1).

Usage: `python -m bench.mutants [--resume] [--children N] [PATTERN ...]`
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .common import ROOT

ANSWERS = ROOT / "bench" / "MUTANTS.md"
WORK = ROOT / "mutants"  # mutmut's own working copy (ignored by git)
RESULT = re.compile(r"^\s*(?P<name>orchestrator\.\S+__mutmut_\d+): (?P<status>.+)$")
COUNTED = ("killed", "survived", "timeout", "suspicious", "segfault")
# Whole modules that guard money or files, and of two larger modules only the functions that do:
# the exit code of a run's outcome, and the store's verbs for intents, ids and file progress.
STORE = "orchestrator.store.sqlite.x\u01c1SqliteDb\u01c1"
GUARDED = (
    "orchestrator.run.reconcile.*",
    "orchestrator.run.resolve.*",
    "orchestrator.run.adopt.*",
    "orchestrator.api.retry.*",
    "orchestrator.transfer.file.*",
    "orchestrator.transfer.ranges.*",
    "orchestrator.store.parts.*",
    "orchestrator.transfer.verify.*",
    "orchestrator.run.outcome.x\u01c1RunOutcome\u01c1exit_code*",
    "orchestrator.run.submit.*",
    *(
        f"{STORE}{verb}__mutmut_*"
        for verb in (
            "record_intents",
            "mark_submitted",
            "mark_submitted_many",
            "record_attempt",
            "answer_lost",
            "adoption_candidates",
            "adopt",
            "record_duplicates",
            "move",
            "settle",
            "file_done",
            "part_record",
            "part_start_over",
            "part_set_etag",
            "part_prove",
            "part_keep_only",
            "file_missing",
            "record_success",
            "file_lost",
        )
    ),
    f"{STORE}_forget_part__mutmut_*",
    "orchestrator.store.sqlite.x__revive_skipped*",
    "orchestrator.store.sqlite.x__parent_is_dead_end*",
)


def _mutmut(*args: str) -> subprocess.CompletedProcess[str]:
    binary = Path(sys.executable).with_name("mutmut")
    return subprocess.run([str(binary), *args], cwd=ROOT, capture_output=True, text=True, check=False)


def _module(name: str) -> str:
    """`orchestrator.transfer.verify.x_place__mutmut_3` -> `orchestrator.transfer.verify`."""
    head = name.split("__mutmut_")[0]
    return ".".join(part for part in head.split(".") if not part.startswith("x"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resume", action="store_true", help="keep mutmut's earlier results")
    # The tests mostly wait on sockets and child processes (a test uses ~40 % of a core): four
    # children per core keep the cores busy (the 35-minute run of 2026-11-30: 8 on 2 cores).
    parser.add_argument("--children", type=int, default=4 * (os.cpu_count() or 2))
    parser.add_argument("patterns", nargs="*", help="mutant name patterns (default: the guarded functions)")
    args = parser.parse_args()
    if not args.resume:
        shutil.rmtree(WORK, ignore_errors=True)
    # On PYTHONPATH below: it must exist before mutmut starts, or Python caches it as missing.
    WORK.mkdir(exist_ok=True)
    started = time.monotonic()
    command = ["run", "--max-children", str(args.children), *(args.patterns or GUARDED)]
    # mutmut runs `type_check_command` (mypy) by name: the environment's own first on PATH.
    # Tests that start the CLI as a process (kill -9, resume) must run the mutated copy too:
    # the mutant under test is named in the environment the child inherits.
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(WORK),
    }
    run = subprocess.run([str(Path(sys.executable).with_name("mutmut")), *command], cwd=ROOT, env=env, check=False)
    took = time.monotonic() - started
    listing = _mutmut("results", "--all", "true")
    statuses: dict[str, str] = {}
    for line in listing.stdout.splitlines():
        match = RESULT.match(line)
        if match:
            statuses[match["name"]] = match["status"].strip()
    per_module: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for name, status in statuses.items():
        per_module[_module(name)][status] += 1
    print(f"\nmutmut run: exit {run.returncode}, {took / 60:.1f} min\n")
    print(f"{'module':40} {'mutants':>8} {'killed':>7} {'survived':>9} {'score':>6}")
    total: collections.Counter[str] = collections.Counter()
    for module in sorted(per_module):
        counts = per_module[module]
        total.update(counts)
        print(_row(module, counts))
    print(_row("all", total))
    answered = ANSWERS.read_text(encoding="utf-8") if ANSWERS.exists() else ""
    # `..._mutmut_1` is not answered by `..._mutmut_15`: a name counts only where no digit follows it.
    open_ = [
        n for n, s in sorted(statuses.items()) if s == "survived" and not re.search(re.escape(n) + r"(?!\d)", answered)
    ]
    if open_:
        print(f"\n{len(open_)} survivors not answered in {ANSWERS.relative_to(ROOT)}:")
        for name in open_:
            print(_mutmut("show", name).stdout)
        return 1
    return 0 if run.returncode == 0 else run.returncode


def _row(module: str, counts: collections.Counter[str]) -> str:
    tested = sum(counts[k] for k in COUNTED)
    killed = tested - counts["survived"]
    score = f"{100 * killed / tested:.0f}%" if tested else "-"
    return f"{module:40} {sum(counts.values()):>8} {killed:>7} {counts['survived']:>9} {score:>6}"


if __name__ == "__main__":
    sys.exit(main())
