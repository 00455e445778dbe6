"""The one tree of exceptions Callgate raises, so callers can tell failures apart.

::

    CallgateError
    ├── ConfigError                     bad CALLGATE_* setting (start-up only)
    ├── StoreError                      Redis/Valkey unreachable or misbehaving
    ├── NotFoundError (LookupError)
    │   ├── WorkspaceNotFoundError
    │   ├── AgentNotFoundError
    │   └── UnknownNumberError
    ├── ConflictError
    │   └── NumberOwnedError            number already claimed by a workspace
    ├── InvalidInputError (ValueError)  operator input that fails validation
    ├── AuthError
    │   ├── SignatureError              X-Twilio-Signature missing or wrong
    │   └── StreamTokenError            stream token forged, expired or reused
    ├── SealError                       a sealed credential cannot be opened
    ├── ProtocolError
    │   └── InvalidStreamMessageError   malformed Twilio Media Streams frame
    ├── UpstreamError                   an agent platform failed or refused
    ├── TwilioActionError               Twilio's API refused an operator action
    ├── TwilioApiError                  (tenancy.twilio_api) a REST call failed
    ├── PlanError (InvalidInputError)   (metering.plans) a plan field is invalid
    └── OperatorClientError             (router.operator_client) the CLI's errors:
        MissingKeyError, UnreachableError, ProblemError, AnswerError
"""

from __future__ import annotations


class CallgateError(Exception):
    """Root of every error Callgate raises on purpose."""


class ConfigError(CallgateError):
    """A setting is missing or malformed; raised only at start-up."""


class StoreError(CallgateError):
    """The store could not be reached or answered unexpectedly."""


class NotFoundError(CallgateError, LookupError):
    """A resource does not exist, or is not visible to the caller."""


class WorkspaceNotFoundError(NotFoundError):
    """No workspace has this id."""


class AgentNotFoundError(NotFoundError):
    """The workspace has no agent with this id."""


class UnknownNumberError(NotFoundError):
    """No workspace owns this phone number."""


class ConflictError(CallgateError):
    """The request conflicts with the current state."""


class NumberOwnedError(ConflictError):
    """The phone number already belongs to a workspace."""


class InvalidInputError(CallgateError, ValueError):
    """Input failed validation; ``field`` names the offending field."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class AuthError(CallgateError):
    """A request could not be authenticated."""


class SignatureError(AuthError):
    """The Twilio request signature is missing or does not match."""


class StreamTokenError(AuthError):
    """A stream token is malformed, forged, expired or already used."""


class SealError(CallgateError):
    """A sealed secret cannot be opened with this key and context."""


class ProtocolError(CallgateError):
    """A peer broke its wire protocol."""


class InvalidStreamMessageError(ProtocolError, ValueError):
    """A Twilio Media Streams frame is malformed or out of place."""


class UpstreamError(CallgateError):
    """An agent platform could not be reached, refused, or failed."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class TwilioActionError(CallgateError):
    """An operator action needed Twilio's API, which failed or refused."""
