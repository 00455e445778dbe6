"""SIP URIs and the far-end interface a <Dial><Sip> leg reaches, shared by peers."""

from dataclasses import dataclass
from typing import Literal, Protocol

__all__ = ["HangUpBy", "SipEndpoint", "SipUri", "parse_sip_uri"]

# Who ended an answered (or ringing) dialed leg: the dialed party, the original
# caller, Twilio enforcing <Dial timeLimit>, or a REST update of the call.
HangUpBy = Literal["callee", "caller", "limit", "rest"]


@dataclass(frozen=True, slots=True)
class SipUri:
    """A parsed sip: or sips: URI, e.g. sip:CALLID@sip.retellai.com;transport=tcp."""

    text: str
    scheme: Literal["sip", "sips"]
    user: str
    host: str
    port: int | None
    params: tuple[tuple[str, str], ...]

    def param(self, name: str) -> str | None:
        """The value of a ;name=value URI parameter (case-insensitive name)."""
        wanted = name.lower()
        for key, value in self.params:
            if key.lower() == wanted:
                return value
        return None


def parse_sip_uri(text: str) -> SipUri | None:
    """Parse sip:user@host[:port][;k=v...]; None if it is not such a URI.

    A user part is required: Twilio dials a party, not a bare server.
    """
    text = text.strip()
    scheme, colon, rest = text.partition(":")
    scheme = scheme.lower()
    if not colon or scheme not in ("sip", "sips"):
        return None
    address, *raw_params = rest.split(";")
    user, at, hostport = address.rpartition("@")
    if not at or not user or not hostport:
        return None
    host, port_colon, port_text = hostport.partition(":")
    port: int | None = None
    if port_colon:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            return None
        port = int(port_text)
    if not host or any(ch.isspace() for ch in text):
        return None
    params = []
    for raw in raw_params:
        key, _, value = raw.partition("=")
        if not key:
            return None
        params.append((key, value))
    # The literal check keeps mypy's Literal type without a cast.
    kind: Literal["sip", "sips"] = "sips" if scheme == "sips" else "sip"
    return SipUri(text, kind, user, host.lower(), port, tuple(params))


class SipEndpoint(Protocol):
    """The far end of a <Dial><Sip> leg; FakeRetell is one.

    The Twilio simulator calls these as the test drives the leg: sip_invite when
    Twilio sends the INVITE, sip_answered on 200 OK, sip_ended on BYE or CANCEL.
    """

    def sip_invite(self, uri: SipUri, call_sid: str) -> int | None:
        """Return None to accept the INVITE, or the final SIP failure code."""
        ...

    def sip_answered(self, uri: SipUri, call_sid: str) -> None:
        """The leg was answered; call_sid is the child leg's CA sid."""
        ...

    def sip_ended(self, uri: SipUri, by: HangUpBy) -> None:
        """An accepted leg ended, answered or not."""
        ...
