"""`SqliteBatches`: many verbs of `SqliteDb` in one transaction (store/threaded.py's group
commit), mixed into `SqliteDb`.

Inside `batch()` a verb's transaction (`SqliteDb._tx`) is a SAVEPOINT of the batch's one
transaction: a verb that fails undoes only its own change, and one commit (synced if any
change in it must be) makes every change of the batch durable at once. SQLite reads
`synchronous` when a transaction begins, so a batch is synced or not from its start.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import StoreError


class SqliteBatches:
    # SqliteDb's: its connection and path, the batch under way, and the commits made
    _db: sqlite3.Connection
    path: Path
    _batch: _Batch | None
    tally: CommitTally

    @contextmanager
    def _savepoint(self, batch: _Batch, *, durable: bool) -> Iterator[sqlite3.Connection]:
        """One verb's change inside a batch: undone alone if the verb fails."""
        if durable and not batch.durable:
            # The batch's sync is chosen before it begins (SQLite reads `synchronous` at BEGIN).
            raise RuntimeError("a synced change in a batch that is not synced: store/threaded.py must say durable")
        db = self._db
        try:
            db.execute("SAVEPOINT change")
            try:
                yield db
            except BaseException:
                if db.in_transaction:  # an I/O error may have rolled the whole batch back already
                    db.execute("ROLLBACK TO change")
                    db.execute("RELEASE change")
                raise
            db.execute("RELEASE change")
            batch.changes += 1
        except sqlite3.Error as exc:
            raise StoreError(f"state store {self.path}: {exc}") from exc

    @contextmanager
    def batch(self, *, durable: bool) -> Iterator[_Batch]:
        """One transaction for many verbs (group commit), synced if `durable`. Raises StoreError
        if the commit fails: then none of its changes happened. `broken()` of the batch tells
        whether its transaction was lost midway (an I/O error rolls all of it back)."""
        db = self._db
        batch = _Batch(durable=durable, db=db)
        try:
            if durable:
                db.execute("PRAGMA synchronous=FULL")
            db.execute("BEGIN IMMEDIATE")
            self._batch = batch
            try:
                yield batch
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            finally:
                self._batch = None
            if db.in_transaction:
                try:
                    db.execute("COMMIT")
                except BaseException:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                    raise
                if batch.changes:
                    self.tally.count(changes=batch.changes, synced=durable)
        except sqlite3.Error as exc:
            raise StoreError(f"state store {self.path}: {exc}") from exc
        finally:
            if durable:
                db.execute("PRAGMA synchronous=NORMAL")


class _Batch:
    """The transaction a batch of verbs shares."""

    __slots__ = ("changes", "db", "durable")

    def __init__(self, *, durable: bool, db: sqlite3.Connection) -> None:
        self.db, self.durable, self.changes = db, durable, 0

    def broken(self) -> bool:
        """The transaction is gone: an error made SQLite roll all of it back."""
        return not self.db.in_transaction


class CommitTally:
    """Commits made, synced commits among them, and the changes they held: what the end of
    a run logs (`store.commits`), and what the throughput benchmark reports per job."""

    __slots__ = ("changes", "commits", "synced")

    def __init__(self) -> None:
        self.commits = self.synced = self.changes = 0

    def count(self, *, changes: int, synced: bool) -> None:
        self.commits += 1
        self.synced += synced
        self.changes += changes
