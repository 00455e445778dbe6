"""Tests for the key builder: hash tags and identifier checks."""

from __future__ import annotations

import pytest

from tenancy import keyspace
from tenancy.errors import InvalidInputError


def test_workspace_keys_share_one_hash_tag() -> None:
    """Every key of a workspace carries its {ws:<id>} hash tag."""
    workspace_id = keyspace.new_id("ws")
    agent_id = keyspace.new_id("ag")
    keys = [
        keyspace.workspace(workspace_id),
        keyspace.agents(workspace_id),
        keyspace.agent(workspace_id, agent_id),
        keyspace.numbers(workspace_id),
        keyspace.number(workspace_id, "+14155550100"),
        keyspace.call(workspace_id, "CA" + "0" * 32),
        keyspace.calls(workspace_id),
        keyspace.usage(workspace_id, "2026-12"),
        keyspace.usage(workspace_id, "2026-12-03"),
        keyspace.stream_token(workspace_id, "n" * 24),
    ]
    assert all(f"{{ws:{workspace_id}}}" in key for key in keys)
    assert len(set(keys)) == len(keys)


@pytest.mark.parametrize(
    "build",
    [
        lambda: keyspace.workspace("ws_}{evil"),
        lambda: keyspace.agent(keyspace.new_id("ws"), "ag_*"),
        lambda: keyspace.number(keyspace.new_id("ws"), "+1 415"),
        lambda: keyspace.call(keyspace.new_id("ws"), "CA:other"),
        lambda: keyspace.usage(keyspace.new_id("ws"), "2026-1"),
    ],
)
def test_keys_refuse_identifiers_that_could_escape(build: object) -> None:
    """Identifiers with braces, globs or separators never become keys."""
    assert callable(build)
    with pytest.raises(InvalidInputError):
        build()


def test_scan_patterns_match_literal_braces_and_one_kind() -> None:
    """The hash tag's braces are escaped; a kind narrows the pattern to its keys."""
    workspace_id = "ws_" + "a" * 16
    assert keyspace.workspace_pattern(workspace_id) == f"cg:\\{{ws:{workspace_id}\\}}:*"
    assert keyspace.workspace_pattern(workspace_id, "usage") == (
        f"cg:\\{{ws:{workspace_id}\\}}:usage:*"
    )
