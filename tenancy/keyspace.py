"""Every Redis key Callgate reads or writes is built here, and nowhere else.

A workspace's keys all carry the hash tag ``{ws:<id>}`` so they share one Redis
Cluster slot, which keeps multi-key Lua scripts cluster-safe and makes a
workspace's data findable (and deletable) by one ``SCAN`` pattern.

Global keys, the only ones outside a workspace:

``cg:workspaces``
    sorted set of workspace ids, scored by creation time in milliseconds.
``cg:numbers``
    hash from an E.164 number to the id of the one workspace that owns it.
``cg:twilio_accounts``
    hash from a Twilio subaccount sid to the workspace it was made for.
``cg:{offboarding}:states``
    hash from a workspace id to the JSON state of its offboarding, which must
    outlive the workspace it deletes.
``cg:{offboarding}:leases``
    hash from a workspace id to ``<process token>:<expiry ms>``: the one
    process running its offboarding now. It shares the hash tag
    ``{offboarding}`` with the states, so one script can check a lease and
    save a state on a Redis Cluster too.
``cg:certificates``
    hash from a deleted workspace's id to its deletion certificate (counts,
    times and the export's hash; no personal data).
``cg:webhook``
    hash: the operator's budget webhook for every workspace (URL, sealed
    signing secret, registration time).
``cg:webhooks_due``
    sorted set of workspace ids with budget events to deliver, scored by the
    time (ms) their next delivery attempt is due.

Identifiers are checked before they become part of a key, so nothing read
from the wire can reach into another workspace's namespace.
"""

from __future__ import annotations

import re
import secrets
from base64 import b32encode

from tenancy.errors import InvalidInputError

PREFIX = "cg"
WORKSPACES = f"{PREFIX}:workspaces"
NUMBERS = f"{PREFIX}:numbers"
TWILIO_ACCOUNTS = f"{PREFIX}:twilio_accounts"
# The offboarding keys a script touches together share one cluster slot.
OFFBOARDINGS = f"{PREFIX}:{{offboarding}}:states"
OFFBOARDING_LEASES = f"{PREFIX}:{{offboarding}}:leases"
CERTIFICATES = f"{PREFIX}:certificates"
WEBHOOK = f"{PREFIX}:webhook"
WEBHOOKS_DUE = f"{PREFIX}:webhooks_due"
GLOBAL_KEYS = frozenset(
    {
        WORKSPACES,
        NUMBERS,
        TWILIO_ACCOUNTS,
        OFFBOARDINGS,
        CERTIFICATES,
        OFFBOARDING_LEASES,
        WEBHOOK,
        WEBHOOKS_DUE,
    }
)
# Where a workspace's budget events go: its own webhook, the operator's one.
WEBHOOK_TARGETS = ("workspace", "operator")

_ID_BODY = "[a-z2-7]{16}"
WORKSPACE_ID = re.compile(rf"ws_{_ID_BODY}")
AGENT_ID = re.compile(rf"ag_{_ID_BODY}")
KEY_ID = re.compile(rf"ky_{_ID_BODY}")
E164 = re.compile(r"\+[1-9][0-9]{1,14}")
CALL_SID = re.compile(r"CA[0-9a-f]{32}")
ACCOUNT_SID = re.compile(r"AC[0-9a-f]{32}")
_NONCE = re.compile(r"[A-Za-z0-9_-]{16,64}")
_PERIOD = re.compile(r"[0-9]{4}-[0-9]{2}(-[0-9]{2})?")


def new_id(kind: str) -> str:
    """A fresh random id such as ``ws_k3x...``: 80 bits, lowercase base32."""
    body = b32encode(secrets.token_bytes(10)).decode("ascii").lower()
    return f"{kind}_{body}"


def check(pattern: re.Pattern[str], value: str, field: str) -> str:
    """Return ``value`` if it fully matches ``pattern``, else raise for ``field``."""
    if not pattern.fullmatch(value):
        raise InvalidInputError(f"{field} is not a valid identifier", field=field)
    return value


def workspace_prefix(workspace_id: str) -> str:
    """The prefix of every key of one workspace, hash tag included."""
    check(WORKSPACE_ID, workspace_id, "workspace_id")
    return f"{PREFIX}:{{ws:{workspace_id}}}"


def workspace_pattern(workspace_id: str, kind: str = "") -> str:
    """A ``SCAN MATCH`` pattern for a workspace's keys, or those of one kind.

    ``kind="usage"`` matches the usage hash of every period.
    """
    escaped = workspace_prefix(workspace_id).replace("{", "\\{").replace("}", "\\}")
    return f"{escaped}:{kind}:*" if kind else f"{escaped}:*"


def workspace(workspace_id: str) -> str:
    """Hash: the workspace's own record (name, status, timestamps)."""
    return f"{workspace_prefix(workspace_id)}:meta"


def agents(workspace_id: str) -> str:
    """Set: ids of the workspace's agents."""
    return f"{workspace_prefix(workspace_id)}:agents"


def agent(workspace_id: str, agent_id: str) -> str:
    """Hash: one agent (provider, assistant id, sealed API key)."""
    check(AGENT_ID, agent_id, "agent_id")
    return f"{workspace_prefix(workspace_id)}:agent:{agent_id}"


def numbers(workspace_id: str) -> str:
    """Set: the E.164 numbers the workspace owns."""
    return f"{workspace_prefix(workspace_id)}:numbers"


def number(workspace_id: str, e164: str) -> str:
    """Hash: one owned number (agent it routes to, owning Twilio account)."""
    check(E164, e164, "number")
    return f"{workspace_prefix(workspace_id)}:number:{e164}"


def stream_token(workspace_id: str, nonce: str) -> str:
    """String with a TTL: marks a stream token as issued and not yet used."""
    check(_NONCE, nonce, "nonce")
    return f"{workspace_prefix(workspace_id)}:streamtok:{nonce}"


def call(workspace_id: str, call_sid: str) -> str:
    """Hash: one call record."""
    check(CALL_SID, call_sid, "call_sid")
    return f"{workspace_prefix(workspace_id)}:call:{call_sid}"


def calls(workspace_id: str) -> str:
    """Sorted set: call sids, scored by the time the call arrived (ms)."""
    return f"{workspace_prefix(workspace_id)}:calls"


def quota(workspace_id: str, period: str) -> str:
    """Hash: the budget of one billing period (``limit_ms``, ``used_ms``,
    ``reserved_ms``)."""
    if not _PERIOD.fullmatch(period):
        raise InvalidInputError("period must be YYYY-MM or YYYY-MM-DD", "period")
    return f"{workspace_prefix(workspace_id)}:quota:{period}"


def grant(workspace_id: str, call_sid: str) -> str:
    """Hash: a live call's grant (held and used ms, report sequence, lease)."""
    check(CALL_SID, call_sid, "call_sid")
    return f"{workspace_prefix(workspace_id)}:grant:{call_sid}"


def leases(workspace_id: str) -> str:
    """Sorted set: live calls' sids, scored by their lease expiry (ms)."""
    return f"{workspace_prefix(workspace_id)}:leases"


def api_key(workspace_id: str, key_id: str) -> str:
    """Hash: one workspace API key (role, name, HMAC digest of its secret)."""
    check(KEY_ID, key_id, "key_id")
    return f"{workspace_prefix(workspace_id)}:key:{key_id}"


def api_keys(workspace_id: str) -> str:
    """Set: ids of the workspace's API keys, live and revoked."""
    return f"{workspace_prefix(workspace_id)}:keys"


def audit(workspace_id: str) -> str:
    """Stream: the workspace's audit log (capped)."""
    return f"{workspace_prefix(workspace_id)}:audit"


def subject_certificates(workspace_id: str) -> str:
    """Stream: certificates of the workspace's data-subject requests."""
    return f"{workspace_prefix(workspace_id)}:subjects"


def unreconciled(workspace_id: str) -> str:
    """Sorted set: settled calls Twilio has not yet reported, scored by end (ms)."""
    return f"{workspace_prefix(workspace_id)}:unreconciled"


def plan(workspace_id: str) -> str:
    """Hash: the workspace's plan (flat fields, see metering.plans)."""
    return f"{workspace_prefix(workspace_id)}:plan"


def usage(workspace_id: str, period: str) -> str:
    """Hash: usage counters for a month (``2026-12``) or a day (``2026-12-03``).

    Fields: ``ms`` and ``calls`` for the workspace, and ``agent:<id>:ms``,
    ``number:<e164>:ms`` per agent and per number.
    """
    if not _PERIOD.fullmatch(period):
        raise InvalidInputError("period must be YYYY-MM or YYYY-MM-DD", "period")
    return f"{workspace_prefix(workspace_id)}:usage:{period}"


def budget_events(workspace_id: str) -> str:
    """Stream: budget events (50/80/100% and cut-off), at most one of each per
    period, in the order they happened."""
    return f"{workspace_prefix(workspace_id)}:budget_events"


def webhook(workspace_id: str) -> str:
    """Hash: the workspace's own budget webhook (URL, sealed signing secret)."""
    return f"{workspace_prefix(workspace_id)}:webhook"


def webhook_delivery(workspace_id: str, target: str) -> str:
    """Hash: delivery of the workspace's budget events to one target (the
    workspace's webhook or the operator's): last delivered event, attempts,
    next attempt, last failure."""
    if target not in WEBHOOK_TARGETS:
        raise ValueError("unknown webhook target")
    return f"{workspace_prefix(workspace_id)}:delivery:{target}"


def delivery_lock(workspace_id: str) -> str:
    """String with a TTL: the process delivering the workspace's events now."""
    return f"{workspace_prefix(workspace_id)}:delivery_lock"
