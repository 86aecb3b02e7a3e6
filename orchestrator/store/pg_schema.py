"""The PostgreSQL schema of the shared state: one set of tables for every campaign of a
database (rows carry their campaign), created and upgraded by the tool itself.

The version lives in `dlb_meta`. Creating and upgrading run in one transaction under a
transaction-level advisory lock, so hosts that start together wait for one another and
exactly one of them creates or upgrades; the others then find the version current.
"""

from __future__ import annotations

PG_SCHEMA_VERSION = 5
# A fixed key for pg_advisory_xact_lock: "dlb-schema" folded into a bigint.
SCHEMA_LOCK_KEY = 0x646C_622D_7363_6865

PG_SCHEMA_V1 = """
CREATE TABLE dlb_campaigns (
    name TEXT PRIMARY KEY,
    created_at DOUBLE PRECISION NOT NULL,
    write_checked_at DOUBLE PRECISION
);
CREATE TABLE dlb_jobs (
    campaign TEXT NOT NULL REFERENCES dlb_campaigns (name),
    id TEXT NOT NULL,
    type TEXT NOT NULL,
    state TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    sent_fingerprint TEXT,
    sent_payload TEXT,
    checkpoint_from TEXT,
    remote_id TEXT,
    remote_state TEXT,
    percentage DOUBLE PRECISION,
    checkpoint_id TEXT,
    intent_at DOUBLE PRECISION,
    submitted_at DOUBLE PRECISION,
    finished_at DOUBLE PRECISION,
    ended_at DOUBLE PRECISION,
    updated_at DOUBLE PRECISION NOT NULL,
    next_check_at DOUBLE PRECISION,
    checks INTEGER NOT NULL DEFAULT 0,
    reason TEXT,
    in_manifest BOOLEAN NOT NULL DEFAULT TRUE,
    position INTEGER NOT NULL,
    attempt_at DOUBLE PRECISION,
    reconcile_at DOUBLE PRECISION,
    adoption_checked BOOLEAN NOT NULL DEFAULT FALSE,
    duplicate_ids TEXT,
    spec TEXT NOT NULL,
    PRIMARY KEY (campaign, id)
);
CREATE INDEX dlb_jobs_by_state ON dlb_jobs (campaign, state, position);
CREATE INDEX dlb_jobs_by_position ON dlb_jobs (campaign, position, id);
CREATE INDEX dlb_jobs_by_submission ON dlb_jobs (campaign, type, submitted_at);
CREATE INDEX dlb_jobs_by_end ON dlb_jobs (campaign, type, ended_at);
CREATE TABLE dlb_files (
    campaign TEXT NOT NULL,
    job_id TEXT NOT NULL,
    remote_id TEXT NOT NULL,
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    size_bytes BIGINT,
    sha256 TEXT,
    done BOOLEAN NOT NULL DEFAULT FALSE,
    lost BOOLEAN NOT NULL DEFAULT FALSE,
    PRIMARY KEY (campaign, job_id, remote_id),
    UNIQUE (campaign, job_id, name),
    FOREIGN KEY (campaign, job_id) REFERENCES dlb_jobs (campaign, id)
);
CREATE TABLE dlb_part_objects (
    campaign TEXT NOT NULL,
    job_id TEXT NOT NULL,
    remote_id TEXT NOT NULL,
    size BIGINT,
    etag TEXT,
    PRIMARY KEY (campaign, job_id, remote_id)
);
CREATE TABLE dlb_part_spans (
    campaign TEXT NOT NULL,
    job_id TEXT NOT NULL,
    remote_id TEXT NOT NULL,
    start BIGINT NOT NULL,
    length BIGINT NOT NULL,
    PRIMARY KEY (campaign, job_id, remote_id, start)
)
"""

# ---- schema 2: several workers (leases, fencing, the shared submission limits) ----------
# lease_owner / lease_until (the database's clock, epoch seconds) / lease_epoch: who works on
# a job in flight now, until when, and a counter raised on every claim or takeover that
# every write after a claim names (a write by a lease that moved on changes nothing).
# dlb_campaigns.submit_tokens / tokens_at: the campaign's submission rate as one bucket.
# dlb_workers: who runs, from where, last seen when (for `status`).
_V2_LEASES = """
ALTER TABLE dlb_jobs ADD COLUMN lease_owner TEXT;
ALTER TABLE dlb_jobs ADD COLUMN lease_until DOUBLE PRECISION;
ALTER TABLE dlb_jobs ADD COLUMN lease_epoch BIGINT NOT NULL DEFAULT 0;
CREATE INDEX dlb_jobs_by_lease ON dlb_jobs (campaign, lease_owner);
ALTER TABLE dlb_campaigns ADD COLUMN submit_tokens DOUBLE PRECISION;
ALTER TABLE dlb_campaigns ADD COLUMN tokens_at DOUBLE PRECISION;
CREATE TABLE dlb_workers (
    id TEXT PRIMARY KEY,
    campaign TEXT NOT NULL,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    started_at DOUBLE PRECISION NOT NULL,
    heartbeat_at DOUBLE PRECISION NOT NULL,
    stopped_at DOUBLE PRECISION
);
CREATE INDEX dlb_workers_by_campaign ON dlb_workers (campaign, heartbeat_at)
"""

# ---- schema 3: what the workers of a campaign share beyond the jobs -----------------------
# new_jobs_in_round: new jobs recorded by the runs that overlap (`--max-new-jobs` holds for
# them together); it starts again at 0 when a worker joins a campaign no live worker runs.
# list_reader / list_reader_until: the worker that reads the job lists (and so checks the
# jobs at the service) and until when, on the database's clock: one at a time.
_V3_SHARED_LIMITS = """
ALTER TABLE dlb_campaigns ADD COLUMN new_jobs_in_round INTEGER NOT NULL DEFAULT 0;
ALTER TABLE dlb_campaigns ADD COLUMN list_reader TEXT;
ALTER TABLE dlb_campaigns ADD COLUMN list_reader_until DOUBLE PRECISION
"""

# ---- schema 4: multipart uploads into a bucket (resumed after a kill, on any host) ---------
# dlb_uploads: a file's upload under way; dlb_upload_parts: the parts the bucket acknowledged,
# each with the file's digest state after it. Unlike the partial downloads' spans (a worker's
# own files), they outlive a takeover: the upload lives in the shared bucket.
_V4_UPLOADS = """
CREATE TABLE dlb_uploads (
    campaign TEXT NOT NULL,
    job_id TEXT NOT NULL,
    remote_id TEXT NOT NULL,
    upload_id TEXT NOT NULL,
    object_key TEXT NOT NULL,
    part_bytes BIGINT NOT NULL,
    size BIGINT NOT NULL,
    source_etag TEXT,
    PRIMARY KEY (campaign, job_id, remote_id)
);
CREATE TABLE dlb_upload_parts (
    campaign TEXT NOT NULL,
    job_id TEXT NOT NULL,
    remote_id TEXT NOT NULL,
    number INTEGER NOT NULL,
    etag TEXT NOT NULL,
    length BIGINT NOT NULL,
    hash_state BYTEA NOT NULL,
    PRIMARY KEY (campaign, job_id, remote_id, number)
)
"""

# ---- schema 5: a finished job's job.json, kept so that a run can write it again (as SQLite's 4)
_V5_JOB_JSON = """
ALTER TABLE dlb_jobs ADD COLUMN job_json TEXT
"""

PG_MIGRATIONS: dict[int, tuple[str, ...]] = {  # version -> scripts that reach it
    2: (_V2_LEASES,),
    3: (_V3_SHARED_LIMITS,),
    4: (_V4_UPLOADS,),
    5: (_V5_JOB_JSON,),
}
