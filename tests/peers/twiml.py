"""TwiML as the Twilio peer reads it: documents, and the <Dial> verb's settings."""

import re
from dataclasses import dataclass
from typing import Final, Literal
from urllib.parse import urljoin
from xml.etree import ElementTree

from .errors import TwimlError
from .sip import parse_sip_uri

__all__ = [
    "CALLBACK_EVENTS",
    "DEFAULT_RING_TIMEOUT_SECS",
    "DEFAULT_TIME_LIMIT_SECS",
    "DialKind",
    "DialSpec",
    "HttpMethod",
    "parse_dial",
    "parse_twiml",
]

DialKind = Literal["sip", "number"]
HttpMethod = Literal["GET", "POST"]

# §1.2: the call progress events a <Number> or <Sip> can subscribe to.
CALLBACK_EVENTS: Final = frozenset({"initiated", "ringing", "answered", "completed"})
# Twilio's documented defaults for <Dial timeLimit> and <Dial timeout>.
DEFAULT_TIME_LIMIT_SECS: Final = 14_400
DEFAULT_RING_TIMEOUT_SECS: Final = 30
_E164: Final = re.compile(r"\+[1-9][0-9]{1,14}")
# Twilio warning codes for attribute values it ignores in favour of the default.
_WARN_TIME_LIMIT: Final = 13216
_WARN_TIMEOUT: Final = 13212


def parse_twiml(text: str) -> ElementTree.Element | None:
    """Parse a TwiML document; None if it is not well-formed XML."""
    try:
        # The document comes from the server under test over loopback, and the
        # tests need the stdlib tree; defusedxml is not a dependency.
        return ElementTree.fromstring(text)  # noqa: S314
    except ElementTree.ParseError:
        return None


@dataclass(frozen=True, slots=True)
class DialSpec:
    """What one <Dial> asks Twilio to do, with its defaults filled in.

    URLs are absolute when the document had a URL to resolve them against.
    warnings holds what Twilio would flag and then ignore, e.g. "13216 ...".
    """

    kind: DialKind
    target: str
    time_limit_secs: int
    ring_timeout_secs: int
    action_url: str | None
    action_method: HttpMethod
    caller_id: str | None
    answer_on_bridge: bool
    status_callback_url: str | None
    status_callback_method: HttpMethod
    status_callback_events: frozenset[str]
    warnings: tuple[str, ...] = ()


def parse_dial(dial: ElementTree.Element, base_url: str | None = None) -> DialSpec:
    """Read a <Dial> element (§1.6), resolving relative URLs against base_url.

    Raises TwimlError for a <Dial> Twilio refuses (a <Sip> beside another noun,
    a malformed SIP URI, nothing to dial) or one the simulator does not play
    (<Client>, <Conference>, several <Number>s). Bad timeLimit or timeout values
    only warn, as Twilio's 13216 and 13212 do, and fall back to the default.
    """
    warnings: list[str] = []
    time_limit = _positive_int(
        dial.get("timeLimit"), DEFAULT_TIME_LIMIT_SECS, "timeLimit", warnings
    )
    ring_timeout = _positive_int(
        dial.get("timeout"), DEFAULT_RING_TIMEOUT_SECS, "timeout", warnings
    )
    kind, target, noun = _dial_target(dial)

    events: frozenset[str] = frozenset()
    callback_url = None
    callback_method: HttpMethod = "POST"
    if noun is not None:
        callback_url = _resolve(noun.get("statusCallback"), base_url)
        callback_method = _method(noun.get("statusCallbackMethod"), warnings)
        events = _events(noun.get("statusCallbackEvent"), warnings)
    if kind == "number" and not _E164.fullmatch(target):
        # Twilio also dials unformatted US numbers, so this only warns.
        warnings.append(f"number {target!r} is not E.164")
    return DialSpec(
        kind=kind,
        target=target,
        time_limit_secs=time_limit,
        ring_timeout_secs=ring_timeout,
        action_url=_resolve(dial.get("action"), base_url),
        action_method=_method(dial.get("method"), warnings),
        caller_id=dial.get("callerId"),
        answer_on_bridge=(dial.get("answerOnBridge") or "").lower() == "true",
        status_callback_url=callback_url,
        status_callback_method=callback_method,
        status_callback_events=events,
        warnings=tuple(warnings),
    )


def _dial_target(
    dial: ElementTree.Element,
) -> tuple[DialKind, str, ElementTree.Element | None]:
    nouns = list(dial)
    if not nouns:
        # <Dial>+15551234567</Dial>: a bare number, with no callback attributes.
        text = (dial.text or "").strip()
        if not text:
            raise TwimlError("<Dial> has nothing to dial")
        return "number", text, None

    tags = [noun.tag for noun in nouns]
    if "Sip" in tags:
        if len(nouns) != 1:
            raise TwimlError("<Dial> allows one <Sip> and no other noun")
        uri = (nouns[0].text or "").strip()
        if parse_sip_uri(uri) is None:
            raise TwimlError(f"<Sip> holds no valid sip uri: {uri!r}")
        return "sip", uri, nouns[0]
    unsupported = sorted(set(tags) - {"Number"})
    if unsupported:
        raise TwimlError(f"the simulator does not dial <{unsupported[0]}>")
    if len(nouns) > 1:
        raise TwimlError("the simulator dials one <Number> per <Dial>")
    number = (nouns[0].text or "").strip()
    if not number:
        raise TwimlError("<Number> is empty")
    return "number", number, nouns[0]


def _positive_int(
    value: str | None, default: int, name: str, warnings: list[str]
) -> int:
    if value is None:
        return default
    text = value.strip()
    if text.isascii() and text.isdigit() and int(text) > 0:
        return int(text)
    code = _WARN_TIME_LIMIT if name == "timeLimit" else _WARN_TIMEOUT
    warnings.append(f"{code} invalid {name} {value!r}; using {default}")
    return default


def _method(value: str | None, warnings: list[str]) -> HttpMethod:
    if value is None or value.upper() == "POST":
        return "POST"
    if value.upper() == "GET":
        return "GET"
    warnings.append(f"invalid method {value!r}; using POST")
    return "POST"


def _events(value: str | None, warnings: list[str]) -> frozenset[str]:
    if value is None:
        # §1.2: with a statusCallback and no event list, only completed fires.
        return frozenset({"completed"})
    # TwiML separates events with spaces; some examples use commas.
    named = set(value.replace(",", " ").split())
    unknown = sorted(named - CALLBACK_EVENTS)
    if unknown:
        warnings.append(f"unknown statusCallbackEvent {', '.join(unknown)}")
    return frozenset(named & CALLBACK_EVENTS)


def _resolve(url: str | None, base_url: str | None) -> str | None:
    if url is None or not url.strip():
        return None
    return urljoin(base_url, url.strip()) if base_url else url.strip()
