"""Checks before the first paid POST: whatever would stop a run after it has spent money
is tried first, and a failure exits 2 with nothing sent (a refused key: 3).

- `check_scheme`: `--out` and `--state` name local paths, or for `--state` a
  postgresql:// database; a `scheme://` location the tool does not handle is refused
  (`HANDLED_SCHEMES`: s3:// for --out, postgresql:// for --state).
- `check_api_url`: `--api-url` is http(s) with a host.
- `check_output`, `check_state`: the folders can be made and written (a probe file is
  written, synced and removed); `--out` naming a file, or `--state` a folder, is refused.
- `check_store`: the opened state store takes a synced write.
- `check_api`: the API answers an authenticated listing of one job, after a few quick
  tries (`retry.preflight`) and within `RunSettings.preflight_deadline_s`.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

import anyio

from ..api import retry
from ..api.client import ApiClient
from ..config import RetryPolicy
from ..errors import ApiError, AuthError, PreflightFailed, QuotaError, StoreError, TransportError, describe_detail
from ..models import JobType
from ..store import Store
from ..transfer.urls import redact

# Location schemes each option handles; anything else written `scheme://` is refused.
HANDLED_SCHEMES: Mapping[str, frozenset[str]] = {
    "--out": frozenset({"s3"}),
    "--state": frozenset({"postgresql", "postgres"}),
}
API_SCHEMES = frozenset({"http", "https"})
PROBE_PREFIX = ".dreamlook-batch-probe-"
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def check_scheme(option: str, value: str) -> str | None:
    """The scheme of `value` if `option` handles it; None for a local path; else PreflightFailed.

    Without this, `--out s3://bucket/x` would quietly become a local folder `s3:`.
    """
    match = _SCHEME.match(value)
    if match is None:
        return None
    scheme = match.group(1).lower()
    if scheme in HANDLED_SCHEMES.get(option, frozenset()):
        return scheme
    raise PreflightFailed(
        f"{option} {redact(value)}: {scheme}:// locations are not supported; give a local path. Nothing was sent."
    )


def check_api_url(url: str) -> None:
    parts = _split(url)
    if parts is None or parts[0] not in API_SCHEMES or not parts[1]:
        raise PreflightFailed(
            f"--api-url {redact(url)!r} is not an http(s) URL with a host (e.g. https://api.dreamlook.ai); "
            "set --api-url or DREAMLOOK_API_URL. Nothing was sent."
        )


def _split(url: str) -> tuple[str, str] | None:
    try:
        parts = urlsplit(url)
        return parts.scheme.lower(), parts.hostname or ""
    except ValueError:
        return None


def check_output(folder: Path, *, create: bool = True) -> None:
    """`--out` is (or can become) a folder we can write; with `create`, made and probed."""
    _check_folder("--out", folder, folder, create=create)


def check_state(path: Path, *, create: bool = True) -> None:
    """The state file can exist, and its folder is (or can become) one we can write."""
    check_state_path(path, path.name)
    _check_folder("--state", path, path.parent, create=create)


def check_state_path(state: Path, name: str) -> None:
    """A state path that can never hold a state file (a folder, or under a file): said before anything runs."""
    if state.is_dir():
        raise PreflightFailed(
            f"--state {state}: is a folder; --state names the state file itself, e.g. --state {state / name}. "
            "Nothing was sent."
        )
    for parent in state.parents:
        if parent.exists():
            if not parent.is_dir():
                raise PreflightFailed(
                    f"--state {state}: cannot exist, {parent} is a file, not a folder; choose another --state. "
                    "Nothing was sent."
                )
            break


async def check_store(store: Store) -> None:
    try:
        await store.check_writable()
    except StoreError as exc:
        raise PreflightFailed(f"--state {store.location}: cannot be written ({exc}). Nothing was sent.") from exc


def _check_folder(option: str, shown: Path, folder: Path, *, create: bool) -> None:
    def refuse(why: str) -> PreflightFailed:
        return PreflightFailed(f"{option} {shown}: {why}. Nothing was sent.")

    if folder.exists() and not folder.is_dir():
        raise refuse(f"{folder} is a file, not a folder")
    if not create:
        ancestor = next(p for p in (folder, *folder.parents) if p.exists())
        if not ancestor.is_dir():
            raise refuse(f"{ancestor} is a file, not a folder")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise refuse(f"{ancestor} cannot be written")
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=PROBE_PREFIX, dir=folder)
        try:
            os.write(fd, b"probe\n")
            os.fsync(fd)
        finally:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(probe)
    except OSError as exc:
        raise refuse(f"cannot write there ({exc.strerror or exc})") from exc


async def check_api(api: ApiClient, job_type: JobType, policy: RetryPolicy, deadline_s: float) -> None:
    """One authenticated listing of one job, a few quick tries, at most `deadline_s`."""
    url = redact(api.base_url)

    async def list_one() -> object:
        return await api.list_jobs(job_type, limit=1)

    try:
        with anyio.fail_after(deadline_s):
            await retry.preflight(list_one, policy, f"check the API at {url}")
    except (AuthError, QuotaError) as exc:
        raise type(exc)(
            exc.status,
            f"{describe_detail(exc.detail)}: the API refused the key; check DREAMLOOK_API_KEY (or --api-key-file). "
            "Nothing was sent",
            f"checking the API at {url}",
        ) from exc
    except TimeoutError as exc:
        raise PreflightFailed(
            f"the API at {url} did not answer within {deadline_s:g} s. Nothing was sent: "
            "check --api-url and the network, then run again."
        ) from exc
    except (ApiError, TransportError) as exc:
        raise PreflightFailed(
            f"the API at {url} cannot be used: {exc}. Nothing was sent: check --api-url and the network, "
            "then run again."
        ) from exc
