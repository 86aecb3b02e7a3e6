"""`safe_name`: names from the server never become paths that leave their folder."""

from __future__ import annotations

import pytest

from orchestrator.api.jobs import safe_name


@pytest.mark.parametrize("raw", ["..", ".", "", "...", "%2E%2E", "a/..", "a/%2e%2e", "..\\..", "/", "-._"])
@pytest.mark.parametrize("fallback", ["..", ".", "", "%2E%2E", "../.."])
def test_names_of_dots_or_nothing_get_a_safe_fallback(raw: str, fallback: str) -> None:
    assert safe_name(raw, fallback) == "file"


def test_a_name_that_cleans_to_nothing_takes_the_files_id() -> None:
    assert safe_name("..", "ckp_1a2b") == "ckp_1a2b"
    assert safe_name("%2E%2E%2E", "gi_00ff") == "gi_00ff"


@pytest.mark.parametrize("raw", ["..%2F..%2F%0Aevil%01x.safetensors", "../../etc/passwd", "a\\..\\b", "\n.."])
def test_names_never_hold_a_path_or_a_leading_dot(raw: str) -> None:
    name = safe_name(raw, "id")
    assert name not in ("", ".", "..") and "/" not in name and "\\" not in name and not name.startswith(".")
    assert name.isprintable()
