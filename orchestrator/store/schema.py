"""The SQLite schema of a campaign's state: version 1 as first written, and the scripts
that upgrade an older file to each later version (run in the transaction that reads the
version, so two processes never both migrate)."""

from __future__ import annotations

SCHEMA_VERSION = 4
SCHEMA_V1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    type TEXT NOT NULL,
    state TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    sent_fingerprint TEXT,
    sent_payload TEXT,
    checkpoint_from TEXT,
    remote_id TEXT,
    remote_state TEXT,
    percentage REAL,
    checkpoint_id TEXT,
    intent_at REAL,
    submitted_at REAL,
    finished_at REAL,
    ended_at REAL,
    updated_at REAL NOT NULL,
    next_check_at REAL,
    checks INTEGER NOT NULL DEFAULT 0,
    reason TEXT,
    in_manifest INTEGER NOT NULL DEFAULT 1,
    position INTEGER NOT NULL
);
CREATE INDEX jobs_by_state ON jobs (state, position);
CREATE INDEX jobs_by_submission ON jobs (type, submitted_at);
CREATE INDEX jobs_by_end ON jobs (type, ended_at);
CREATE TABLE files (
    job_id TEXT NOT NULL REFERENCES jobs (id),
    remote_id TEXT NOT NULL,
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    size_bytes INTEGER,
    sha256 TEXT,
    done INTEGER NOT NULL DEFAULT 0,
    lost INTEGER NOT NULL DEFAULT 0,
    etag TEXT,
    PRIMARY KEY (job_id, remote_id),
    UNIQUE (job_id, name)
);
CREATE TABLE file_ranges (
    job_id TEXT NOT NULL,
    remote_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    PRIMARY KEY (job_id, remote_id, idx)
);
"""  # schema 1; what later versions change is in _MIGRATIONS

# ---- schema 2, files: proven spans of partial downloads --------------------------------
# Version 1 kept an index of finished ranges, read back with the current --range-mb: a
# resume with another range size trusted the wrong bytes. It is dropped (those files start
# over, which is safe); a partial file is now its object (size, ETag) and proven spans.
_V2_FILES = """
DROP TABLE file_ranges;
ALTER TABLE files DROP COLUMN etag;
CREATE TABLE part_objects (
    job_id TEXT NOT NULL,
    remote_id TEXT NOT NULL,
    size INTEGER,
    etag TEXT,
    PRIMARY KEY (job_id, remote_id)
);
CREATE TABLE part_spans (
    job_id TEXT NOT NULL,
    remote_id TEXT NOT NULL,
    start INTEGER NOT NULL,
    length INTEGER NOT NULL,
    PRIMARY KEY (job_id, remote_id, start)
);
"""
# ---- end of schema 2, files --------------------------------------------------------------

# ---- schema 2, never paying twice (issue 11 sections 1-2) -------------------------------
# attempt_at: when the last POST of the job was sent (its grace window counts from it);
# reconcile_at: the end of the grace window as the run that sent it computed it;
# adoption_checked: the job list was read for this job's tag before its first submission;
# duplicate_ids: JSON list of the other remote ids the service holds with this job's tag.
# Applied to fresh files after _SCHEMA and to version-1 files as their migration.
_SCHEMA_V2_MONEY = """
ALTER TABLE jobs ADD COLUMN attempt_at REAL;
ALTER TABLE jobs ADD COLUMN reconcile_at REAL;
ALTER TABLE jobs ADD COLUMN adoption_checked INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN duplicate_ids TEXT;
UPDATE jobs SET attempt_at = intent_at WHERE state = 'submitting';
UPDATE jobs SET adoption_checked = 1 WHERE intent_at IS NOT NULL OR remote_id IS NOT NULL
"""
# ---- end of schema 2, never paying twice ---------------------------------------------------

# ---- schema 3: multipart uploads into a bucket (resumed after a kill) ---------------------
# uploads: a file's upload under way (what completing and resuming it need); upload_parts:
# the parts the bucket acknowledged, each with the file's digest state after it. Keyed by
# file like part_objects; a new upload of a file replaces its record and parts.
_V3_UPLOADS = """
CREATE TABLE uploads (
    job_id TEXT NOT NULL,
    remote_id TEXT NOT NULL,
    upload_id TEXT NOT NULL,
    object_key TEXT NOT NULL,
    part_bytes INTEGER NOT NULL,
    size INTEGER NOT NULL,
    source_etag TEXT,
    PRIMARY KEY (job_id, remote_id)
);
CREATE TABLE upload_parts (
    job_id TEXT NOT NULL,
    remote_id TEXT NOT NULL,
    number INTEGER NOT NULL,
    etag TEXT NOT NULL,
    length INTEGER NOT NULL,
    hash_state BLOB NOT NULL,
    PRIMARY KEY (job_id, remote_id, number)
)
"""
# ---- end of schema 3 -------------------------------------------------------------------------

# ---- schema 4: a finished job's job.json, kept so that a run can write it again -------------
# job.json and SHA256SUMS are written without a sync of their own (the folder is synced once):
# a run checks them against the store when it starts, and writes again what is missing or wrong.
_V4_JOB_JSON = """
ALTER TABLE jobs ADD COLUMN job_json TEXT
"""

MIGRATIONS: dict[int, tuple[str, ...]] = {  # version -> scripts that reach it
    2: (_V2_FILES, _SCHEMA_V2_MONEY),
    3: (_V3_UPLOADS,),
    4: (_V4_JOB_JSON,),
}
