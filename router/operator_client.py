"""The operator API as the ``callgate`` command sees it: one request, then a table.

The command runs one request per invocation, so the client here is a single
coroutine that opens a session, sends, and closes it. Failures come back as
:class:`ProblemError` (the server answered with an error),
:class:`UnreachableError` (it did not answer) or :class:`AnswerError` (it
answered without JSON). The rest of the module turns answers into plain-text
tables for people; scripts take the JSON as it came.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp

from tenancy.errors import CallgateError

DEFAULT_URL = "http://127.0.0.1:8080"
API_PREFIX = "/api/v1"
TIMEOUT_SECS = 30.0
_KEY_FILE = "operator_key"


class OperatorClientError(CallgateError):
    """A request of the ``callgate`` command failed; ``str()`` is one line."""


class MissingKeyError(OperatorClientError):
    """No operator key was given and none could be read."""


class UnreachableError(OperatorClientError):
    """The server could not be reached or did not answer in time."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"cannot reach {url}: {reason}")
        self.url = url
        self.reason = reason


class ProblemError(OperatorClientError):
    """The server answered with an error, usually an RFC 9457 problem document."""

    def __init__(
        self, status: int, title: str, detail: str | None, field_name: str | None
    ) -> None:
        message = f"{status} {title.lower()}"
        # The server's 422 details already start with the field; others may not.
        if field_name and not (detail or "").startswith(f"{field_name}:"):
            message += f": {field_name}"
        if detail:
            message += f": {detail}"
        super().__init__(message)
        self.status = status
        self.title = title
        self.detail = detail
        self.field = field_name


class AnswerError(OperatorClientError):
    """The server answered success with a body that is not JSON."""


@dataclass(frozen=True, slots=True)
class Connection:
    """Where the operator API is and the key that opens it."""

    url: str
    # Kept out of repr so a stray print or traceback never shows the key.
    key: str = field(repr=False)


def operator_key(given: str | None, environ: Mapping[str, str]) -> str:
    """The key from ``--key``, ``CALLGATE_OPERATOR_KEY``, or the data dir's file.

    The file is the one ``callgate serve`` generates when no key is set:
    ``operator_key`` in ``CALLGATE_DATA_DIR`` (``.data`` by default).
    """
    if given:
        return given
    if environ.get("CALLGATE_OPERATOR_KEY"):
        return environ["CALLGATE_OPERATOR_KEY"]
    path = Path(environ.get("CALLGATE_DATA_DIR") or ".data") / _KEY_FILE
    try:
        stored = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        stored = ""
    except (OSError, UnicodeDecodeError) as exc:
        raise MissingKeyError(f"cannot read the operator key in {path}: {exc}") from exc
    if not stored:
        raise MissingKeyError(
            f"no operator key: pass --key, set CALLGATE_OPERATOR_KEY, or create {path}"
        )
    return stored


def connection(
    url: str | None, key: str | None, environ: Mapping[str, str]
) -> Connection:
    """The connection the flags ask for, with the environment filling the gaps."""
    base = url or environ.get("CALLGATE_URL") or DEFAULT_URL
    return Connection(url=base.rstrip("/"), key=operator_key(key, environ))


@dataclass(frozen=True, slots=True)
class Request:
    """One call of the operator API; ``path`` is below ``/api/v1``."""

    method: str
    path: str
    body: Mapping[str, Any] | None = None
    query: Mapping[str, str] | None = None


def api_path(*segments: str) -> str:
    """An API path from segments, each quoted whole (``+`` and ``/`` included)."""
    return "".join("/" + quote(segment, safe="") for segment in segments)


@dataclass(frozen=True, slots=True)
class Reply:
    """A successful answer: the body exactly as sent, and decoded.

    ``document`` is None for an empty body (``204 No Content``).
    """

    status: int
    text: str
    document: Any


async def send(
    target: Connection, request: Request, timeout_secs: float = TIMEOUT_SECS
) -> Reply:
    """Send ``request`` in a session of its own; raise on any failure."""
    headers = {
        "Authorization": f"Bearer {target.key}",
        "Accept": "application/json, application/problem+json",
    }
    timeout = aiohttp.ClientTimeout(total=timeout_secs)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.request(
                request.method,
                target.url + API_PREFIX + request.path,
                json=request.body,
                params=request.query,
                headers=headers,
            ) as response,
        ):
            text = await response.text()
            status, reason = response.status, response.reason or ""
    except TimeoutError as exc:
        raise UnreachableError(target.url, f"no answer in {timeout_secs:g} s") from exc
    except aiohttp.ClientError as exc:
        raise UnreachableError(target.url, _reason(exc)) from exc

    if status >= 400:
        raise _problem(status, reason, text)
    try:
        document = json.loads(text) if text else None
    except ValueError:
        raise AnswerError(f"{target.url} answered {status} without JSON") from None
    return Reply(status=status, text=text, document=document)


def _reason(exc: aiohttp.ClientError) -> str:
    if isinstance(exc, aiohttp.ClientConnectorError):
        return exc.os_error.strerror or str(exc.os_error)
    if isinstance(exc, aiohttp.InvalidURL):
        return "not a valid URL"
    return str(exc) or type(exc).__name__


def _problem(status: int, reason: str, text: str) -> ProblemError:
    """The error an error answer stands for, problem document or not."""
    try:
        document = json.loads(text)
    except ValueError:
        document = None
    if not isinstance(document, dict):
        # Not ours: a proxy's error page, say. Its status line is all we trust.
        return ProblemError(status, reason or "error", None, None)
    title, detail, field_name = (
        document.get("title"),
        document.get("detail"),
        document.get("field"),
    )
    return ProblemError(
        status,
        title if isinstance(title, str) else reason or "error",
        detail if isinstance(detail, str) else None,
        field_name if isinstance(field_name, str) else None,
    )


def cell(value: Any) -> str:
    """A JSON value as a table cell: ``-`` for null, lists joined by commas."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, list):
        return ", ".join(cell(item) for item in value) or "-"
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def moment(value: Any) -> str:
    """An API timestamp to the second (``2026-01-02T03:04:05Z``)."""
    if isinstance(value, str) and value.endswith("Z") and "." in value:
        return value.split(".", 1)[0] + "Z"
    return cell(value)


def money(micros: Any) -> str:
    """Micro-units as an exact decimal amount, at least to the cent."""
    if not isinstance(micros, int) or isinstance(micros, bool):
        return cell(micros)
    sign = "-" if micros < 0 else ""
    whole, fraction = divmod(abs(micros), 1_000_000)
    digits = f"{fraction:06d}".rstrip("0").ljust(2, "0")
    return f"{sign}{whole}.{digits}"


@dataclass(frozen=True, slots=True)
class Column:
    """A table column: its header, the document member it shows, and how."""

    header: str
    key: str
    render: Callable[[Any], str] = cell


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column]) -> str:
    """Rows under a header, columns aligned by two spaces, no trailing blanks."""
    lines = [[column.header for column in columns]]
    lines += [
        [column.render(row.get(column.key)) for column in columns] for row in rows
    ]
    widths = [max(len(line[index]) for line in lines) for index in range(len(columns))]
    return "\n".join(
        "  ".join(
            text.ljust(width) for text, width in zip(line, widths, strict=True)
        ).rstrip()
        for line in lines
    )


def record(document: Mapping[str, Any]) -> str:
    """One document as ``name  value`` lines, in the order the API gave them."""
    width = max((len(name) for name in document), default=0)
    return "\n".join(
        f"{name.ljust(width)}  {cell(value)}".rstrip()
        for name, value in document.items()
    )


Render = Callable[[Any], str]

WORKSPACE_COLUMNS = (
    Column("ID", "id"),
    Column("NAME", "name"),
    Column("STATUS", "status"),
    Column("CREATED", "created_at", moment),
)
AGENT_COLUMNS = (
    Column("ID", "id"),
    Column("NAME", "name"),
    Column("PROVIDER", "provider"),
    Column("ASSISTANT", "assistant_id"),
    Column("AUDIO", "audio_format"),
    Column("CREATED", "created_at", moment),
)
NUMBER_COLUMNS = (
    Column("NUMBER", "number"),
    Column("WORKSPACE", "workspace_id"),
    Column("AGENT", "agent_id"),
    Column("TWILIO ACCOUNT", "twilio_account_sid"),
    Column("ATTACHED", "attached_at", moment),
)
CALL_COLUMNS = (
    Column("CALL SID", "call_sid"),
    Column("ARRIVED", "arrived_at", moment),
    Column("FROM", "from_number"),
    Column("TO", "to_number"),
    Column("STATUS", "status"),
    Column("SECONDS", "metered_secs"),
    Column("END REASON", "end_reason"),
    Column("COST", "cost_micros", money),
)
KEY_COLUMNS = (
    Column("ID", "id"),
    Column("ROLE", "role"),
    Column("NAME", "name"),
    Column("CREATED", "created_at", moment),
    Column("LAST USED", "last_used_at", moment),
    Column("REVOKED", "revoked_at", moment),
)
AUDIT_COLUMNS = (
    Column("AT", "at", moment),
    Column("ACTOR", "actor"),
    Column("ACTION", "action"),
    Column("TARGET", "target"),
    Column("DETAIL", "detail"),
)
BUDGET_EVENT_COLUMNS = (
    Column("ID", "id"),
    Column("TYPE", "type"),
    Column("AT", "timestamp", moment),
    Column("USED MS", "data", lambda data: cell(data.get("used_ms"))),
    Column("DELIVERED TO", "delivered_to"),
)
_USAGE_COLUMNS = (Column("SECONDS", "seconds"), Column("CALLS", "calls"))


def rows(columns: Sequence[Column]) -> Render:
    """Renders a list answer (``{"items": [...]}``) as a table."""
    return lambda document: table(document["items"], columns)


def row(columns: Sequence[Column]) -> Render:
    """Renders a one-resource answer as a one-row table."""
    return lambda document: table([document], columns)


def new_key(document: Any) -> str:
    """The new key's row, then its token alone on a line, ready to copy."""
    return (
        f"{table([document], KEY_COLUMNS)}\n\n"
        "token (shown only this once; store it now):\n"
        f"{document['token']}"
    )


def usage(document: Any) -> str:
    """Totals, the plan's statement when there is one, then per agent and number."""
    parts = [
        record(
            {
                "workspace": document["workspace_id"],
                "period": document["period"],
                "seconds": document["seconds"],
                "calls": document["calls"],
                "cost": money(document["cost_micros"]),
            }
        )
    ]
    bill = document.get("statement")
    if bill:
        currency = bill["currency"]
        parts.append(
            record(
                {
                    "billed seconds": bill["billed_ms"] / 1000,
                    "included seconds": bill["included_ms"] / 1000,
                    "overage seconds": bill["overage_ms"] / 1000,
                    "allowance seconds": bill["allowance_ms"] / 1000,
                    f"price ({currency})": money(bill["price_micros"]),
                    f"cost ({currency})": money(bill["cost_micros"]),
                    f"margin ({currency})": money(bill["margin_micros"]),
                }
            )
        )
    for header, member in (("AGENT", "agents"), ("NUMBER", "numbers")):
        lines = [{"owner": owner, **line} for owner, line in document[member].items()]
        parts.append(table(lines, (Column(header, "owner"), *_USAGE_COLUMNS)))
    return "\n\n".join(parts)
