"""Exceptions the peers raise, so a failing test names what the peer saw.

PeerError
├── PeerTimeoutError      (also a TimeoutError) a bounded wait ran out
├── PeerStateError        an operation does not fit the peer's current state
├── StreamRejected        the server refused the media stream WebSocket upgrade
├── TwimlError            the server's TwiML asks for something Twilio refuses
└── DialRefusedError      the far end refused a dialed leg before it could ring
"""

__all__ = [
    "DialRefusedError",
    "PeerError",
    "PeerStateError",
    "PeerTimeoutError",
    "StreamRejected",
    "TwimlError",
]


class PeerError(Exception):
    """Root of every error raised by the protocol peers."""


class PeerTimeoutError(PeerError, TimeoutError):
    """A wait on the server under test ran past its timeout."""

    def __init__(self, waiting_for: str, timeout_secs: float) -> None:
        super().__init__(
            f"timed out after {timeout_secs:g} s waiting for {waiting_for}"
        )
        self.waiting_for = waiting_for
        self.timeout_secs = timeout_secs


class PeerStateError(PeerError):
    """The peer cannot do this now, e.g. send audio before the stream is open."""


# The name reads as the event a test expects ("the upgrade was rejected"); the
# integration tests were specified against it, hence no Error suffix.
class StreamRejected(PeerError):  # noqa: N818
    """The media stream upgrade got an HTTP status other than 101."""

    def __init__(self, status_code: int) -> None:
        super().__init__(f"stream upgrade rejected with http {status_code}")
        self.status_code = status_code


class TwimlError(PeerError):
    """A TwiML element Twilio would refuse, or one the simulator cannot play."""


class DialRefusedError(PeerError):
    """The dialed party answered the INVITE with a final failure, e.g. SIP 404."""

    def __init__(self, target: str, sip_response_code: int) -> None:
        super().__init__(f"dial to {target} refused with sip {sip_response_code}")
        self.target = target
        self.sip_response_code = sip_response_code
