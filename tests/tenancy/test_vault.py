"""Tests for sealing provider credentials at rest."""

from __future__ import annotations

import pytest

from tenancy.errors import SealError
from tenancy.vault import Vault

SECRET = "s" * 40


def test_seal_round_trips_and_hides_the_plaintext() -> None:
    """A sealed value opens in its context and does not contain the secret."""
    vault = Vault(SECRET)
    sealed = vault.seal("vapi-private-key", "agent/ws_a/ag_1")
    assert "vapi-private-key" not in sealed
    assert vault.open(sealed, "agent/ws_a/ag_1") == "vapi-private-key"


def test_seal_is_bound_to_its_context() -> None:
    """A value sealed for one workspace does not open for another."""
    vault = Vault(SECRET)
    sealed = vault.seal("key", "agent/ws_a/ag_1")
    with pytest.raises(SealError):
        vault.open(sealed, "agent/ws_b/ag_1")


def test_seal_needs_the_same_secret_key() -> None:
    """Another secret key cannot open the value."""
    sealed = Vault(SECRET).seal("key", "ctx")
    with pytest.raises(SealError):
        Vault("t" * 40).open(sealed, "ctx")


def test_open_refuses_garbage() -> None:
    """Tampered or foreign values raise SealError, not a crypto exception."""
    vault = Vault(SECRET)
    sealed = vault.seal("key", "ctx")
    tampered = sealed[:-4] + ("AAAA" if not sealed.endswith("AAAA") else "BBBB")
    for value in (tampered, "v0.abc", "nonsense", "v1.!!!"):
        with pytest.raises(SealError):
            vault.open(value, "ctx")
