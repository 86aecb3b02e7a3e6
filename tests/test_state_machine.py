"""Property test of the job state machine, on the real SQLite store.

Hypothesis drives random sequences of what the engine can do (intents, answers,
moves to any state, a person's settle), valid or not. Whatever the sequence:
- a job that the API knows (it has a remote id) never gets a second one, and never
  goes back to pending or submitting: no path submits it twice;
- a terminal job never changes, except an `unknown` one that a person settles;
- a job never moves backwards in its life cycle once the API has acknowledged it;
- a dependent is never stranded: it is `skipped` exactly while its checkpoint_from job
  can give no checkpoint (ended without one), whatever happens to that job afterwards
  (a person settles it, a checkpoint turns up), and a skipped job leaves only for pending.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from orchestrator.errors import StoreError
from orchestrator.manifest.load import spec_fingerprint
from orchestrator.models import PARENT_ENDED, TERMINAL, JobSpec, JobState, JobType
from orchestrator.store import SqliteDb

JOBS = ["a", "b", "c"]
PARENT = {"b": "a", "c": "b"}  # b needs a's checkpoint, c needs b's
ORDER = [
    JobState.PENDING,
    JobState.SUBMITTING,
    JobState.QUEUED,
    JobState.RUNNING,
    JobState.SUCCEEDED,
    JobState.DOWNLOADING,
]


def rank(state: JobState) -> int:
    return len(ORDER) if state in TERMINAL else ORDER.index(state)


class JobLifeCycle(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.TemporaryDirectory()
        self.store = SqliteDb(Path(self.dir.name) / "s.db")
        specs = [
            JobSpec(id=j, type=JobType.DREAMBOOTH, payload={"prompt": j}, checkpoint_from=PARENT.get(j)) for j in JOBS
        ]
        self.store.sync_manifest("c", specs, [spec_fingerprint(s) for s in specs], 0.0)
        self.clock = 1.0
        self.remote_ids: dict[str, str] = {}  # the first remote id each job got
        self.submissions: dict[str, int] = dict.fromkeys(JOBS, 0)  # successful mark_submitted
        self.settled_resubmit: set[str] = set()
        self.last: dict[str, JobState] = dict.fromkeys(JOBS, JobState.PENDING)
        self.just_settled: set[str] = set()  # jobs a person settled in this step

    def teardown(self) -> None:
        self.store.close()
        self.dir.cleanup()

    def _tick(self) -> float:
        self.clock += 1
        return self.clock

    @rule(job=st.sampled_from(JOBS))
    def record_intent(self, job: str) -> None:
        try:
            self.store.record_intents([(job, "{}", "f")], self._tick())
        except StoreError:
            assert self.store.job(job).state is not JobState.PENDING

    @rule(job=st.sampled_from(JOBS), remote=st.sampled_from(["ig_1", "ig_2", "ig_3"]))
    def answer_arrives(self, job: str, remote: str) -> None:
        try:
            self.store.mark_submitted(job, f"{remote}-{job}", self._tick())
        except StoreError:
            return
        self.submissions[job] += 1
        self.remote_ids.setdefault(job, f"{remote}-{job}")

    @rule(job=st.sampled_from(JOBS))
    def checkpoint_arrives(self, job: str) -> None:
        """A success brings the checkpoint (and only a success may)."""
        try:
            self.store.record_success(
                job, checkpoint_id=f"ckpt-{job}", files=[], remote_state="success", now=self._tick()
            )
        except StoreError:
            return

    @rule(job=st.sampled_from(JOBS))
    def the_normal_next_step(self, job: str) -> None:
        """Walk the usual path, so the random moves below also start from deep states."""
        state = self.store.job(job).state
        if state is JobState.PENDING:
            self.record_intent(job)
        elif state is JobState.SUBMITTING:
            self.answer_arrives(job, "ig_1")
        elif state in ORDER[2:]:
            following = ORDER[ORDER.index(state) + 1] if state is not ORDER[-1] else JobState.DONE
            self.store.move(job, following, self._tick())

    @rule(job=st.sampled_from(JOBS), to=st.sampled_from(list(JobState)))
    def move(self, job: str, to: JobState) -> None:
        with_remote = self.store.job(job).remote_id is not None
        try:
            self.store.move(job, to, self._tick())
        except StoreError:
            return
        if with_remote:
            assert to not in (JobState.PENDING, JobState.SUBMITTING)

    @rule(job=st.sampled_from(JOBS), choice=st.sampled_from(["remote", "resubmit", "give-up"]))
    def person_settles(self, job: str, choice: str) -> None:
        before = self.store.job(job).state
        target = {"remote": JobState.QUEUED, "resubmit": JobState.PENDING, "give-up": JobState.FAILED}[choice]
        remote = f"ig_9-{job}" if choice == "remote" else None
        try:
            self.store.settle(job, target, self._tick(), remote_id=remote, reason="by hand")
        except StoreError:
            assert before is not JobState.UNKNOWN
            return
        assert before is JobState.UNKNOWN
        self.just_settled.add(job)
        if choice == "resubmit":
            self.settled_resubmit.add(job)
        if remote is not None:
            self.remote_ids.setdefault(job, remote)

    @invariant()
    def no_second_submission_and_no_way_back(self) -> None:
        for job in JOBS:
            row = self.store.job(job)
            if job not in self.settled_resubmit:
                assert self.submissions[job] <= 1, f"{job} was submitted twice"
                if job in self.remote_ids:
                    assert row.remote_id == self.remote_ids[job]
                    assert row.state not in (JobState.PENDING, JobState.SUBMITTING)
            previous = self.last[job]
            if previous in TERMINAL and row.state is not previous:
                revived = previous is JobState.SKIPPED and row.state is JobState.PENDING and not self._dead_end(job)
                settled = previous is JobState.UNKNOWN and job in self.just_settled
                assert revived or settled, f"{job}: {previous} -> {row.state}"
            settled = job in self.just_settled  # a person's word restarts the life cycle
            if row.remote_id is not None and previous not in (JobState.PENDING, JobState.SUBMITTING) and not settled:
                assert rank(row.state) >= rank(previous), f"{job}: {previous} -> {row.state}"
            self.last[job] = row.state
        self.just_settled.clear()

    def _dead_end(self, job: str) -> bool:
        """Has `job` a parent that can give no checkpoint (ended without one)?"""
        if job not in PARENT:
            return False
        parent = self.store.job(PARENT[job])
        return parent.state in PARENT_ENDED and parent.checkpoint_id is None

    @invariant()
    def skipped_exactly_while_the_parent_is_a_dead_end(self) -> None:
        for job in JOBS:
            if self.store.job(job).state is JobState.SKIPPED:
                assert self._dead_end(job), f"{job} is stranded: skipped, yet {PARENT.get(job)} may still give one"

    @invariant()
    def nothing_terminal_lacks_an_end_time(self) -> None:
        for job in JOBS:
            row = self.store.job(job)
            if row.state in TERMINAL and row.state is not JobState.UNKNOWN:
                assert row.finished_at is not None or row.reason == "by hand"
            if row.state is JobState.PENDING:
                assert row.finished_at is None, f"{job}: pending with an end time"


# Under `make mutants` (MUTANT_UNDER_TEST set) a quarter of the examples: the run repeats this
# test for each of the store verbs' mutants, and 50 sequences of 100 steps still reach every verb.
EXAMPLES = 50 if os.environ.get("MUTANT_UNDER_TEST") else 200
JobLifeCycle.TestCase.settings = settings(max_examples=EXAMPLES, stateful_step_count=100, deadline=None)
TestJobLifeCycle = JobLifeCycle.TestCase


def test_a_person_settling_an_unknown_job_is_the_only_way_out() -> None:
    """The path random search reaches least: submitting -> unknown -> settled by hand."""
    machine = JobLifeCycle()
    try:
        machine.record_intent("a")
        machine.move("a", JobState.UNKNOWN)
        machine.no_second_submission_and_no_way_back()
        machine.move("a", JobState.PENDING)  # refused: only a person may
        assert machine.store.job("a").state is JobState.UNKNOWN
        machine.person_settles("a", "remote")
        machine.no_second_submission_and_no_way_back()
        assert machine.store.job("a").state is JobState.QUEUED and machine.store.job("a").remote_id == "ig_9-a"
        machine.the_normal_next_step("a")
        machine.no_second_submission_and_no_way_back()
        machine.person_settles("a", "give-up")  # refused: no longer unknown
        assert machine.store.job("a").state is JobState.RUNNING
    finally:
        machine.teardown()


def test_a_skipped_dependent_comes_back_when_its_parent_is_settled() -> None:
    """unknown parent -> skipped chain -> a person settles the parent: the chain is pending again."""
    for choice, back in (("remote", True), ("resubmit", True), ("give-up", False)):
        machine = JobLifeCycle()
        try:
            machine.record_intent("a")
            machine.move("a", JobState.UNKNOWN)
            machine.move("c", JobState.SKIPPED)  # refused: b may still give a checkpoint
            assert machine.store.job("c").state is JobState.PENDING
            machine.move("b", JobState.SKIPPED)
            machine.move("c", JobState.SKIPPED)
            machine.move("b", JobState.PENDING)  # refused: a still can give none
            machine.skipped_exactly_while_the_parent_is_a_dead_end()
            assert {machine.store.job(j).state for j in "bc"} == {JobState.SKIPPED}
            machine.no_second_submission_and_no_way_back()
            machine.person_settles("a", choice)
            machine.no_second_submission_and_no_way_back()
            machine.skipped_exactly_while_the_parent_is_a_dead_end()
            expected = JobState.PENDING if back else JobState.SKIPPED
            assert {machine.store.job(j).state for j in "bc"} == {expected}, choice
        finally:
            machine.teardown()


def test_a_checkpoint_that_turns_up_late_brings_the_dependent_back() -> None:
    machine = JobLifeCycle()
    try:
        machine.record_intent("a")
        machine.answer_arrives("a", "ig_1")
        machine.move("a", JobState.SUCCEEDED)  # a success whose checkpoint id was not read yet
        machine.move("b", JobState.SKIPPED)
        assert machine.store.job("b").state is JobState.SKIPPED
        machine.checkpoint_arrives("a")
        machine.no_second_submission_and_no_way_back()
        assert machine.store.job("b").state is JobState.PENDING and machine.store.job("b").reason is None
    finally:
        machine.teardown()


def test_a_manifest_edit_that_frees_a_skipped_dependent_brings_it_back() -> None:
    machine = JobLifeCycle()
    try:
        machine.record_intent("a")
        machine.move("a", JobState.FAILED)
        machine.move("b", JobState.SKIPPED)
        machine.move("c", JobState.SKIPPED)
        # b no longer needs a's checkpoint: b may go, and c waits for b again.
        specs = [
            JobSpec(id="a", type=JobType.DREAMBOOTH, payload={"prompt": "a"}),
            JobSpec(id="b", type=JobType.DREAMBOOTH, payload={"prompt": "b", "base_model": "sd-1.5"}),
            JobSpec(id="c", type=JobType.DREAMBOOTH, payload={"prompt": "c"}, checkpoint_from="b"),
        ]
        machine.store.sync_manifest("c", specs, [spec_fingerprint(s) for s in specs], machine._tick())
        assert [machine.store.job(j).state for j in JOBS] == [JobState.FAILED, JobState.PENDING, JobState.PENDING]
    finally:
        machine.teardown()
