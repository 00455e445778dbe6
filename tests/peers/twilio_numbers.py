"""Which Twilio account owns what, for the fake REST API: subaccounts and numbers (§3).

Pure state, no HTTP: FakeTwilioRest parses a request, calls a TwilioDirectory
method and renders the record it returns, or the RestRefusedError it raises.

Codes the directory answers with, HTTP status first
(https://www.twilio.com/docs/api/errors/<code>):

- 401 20003  bad credentials, an account that is not active, or an account the
             credentials may not reach (docs list subaccount-to-main as 20003)
- 403 20006  subaccount credentials on a main-account operation: creating a
             subaccount or changing an account's Status. Twilio documents no code
             for this case; 20006 "Access Denied" says what happened, while 20008
             is about test credentials. Callgate should not rely on the code.
- 404 20404  an unknown account, number, country or number type
- 400 20001  a missing or malformed parameter (what the calls fake already used)
- 400 20005  buying a number into an account that is not active
- 400 21100  a Status that is not active|suspended|closed, or reopening a closed
             account (the Accounts-resource code, whose page lists both)
- 400 21421  PhoneNumber is not E.164
- 400 21422  PhoneNumber is not available, e.g. already bought
- 400 21451  AreaCode is not a three-digit North American area code
- 400 21452  no number left in that AreaCode (from memory; not in the docs read)
- 400 21472  transferring to an account that is not active
- 400 21473  transferring to an account outside the caller's family
- 400 21474  transferring with a subaccount's credentials
- 400 21477  changing a main account's Status
- 400 21480  the main account already has subaccount_limit subaccounts
"""

import email.utils
import hmac
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Literal

from .errors import PeerError, PeerStateError
from .twilio_auth import API_VERSION, TwilioAccount, new_account

__all__ = [
    "AccountRecord",
    "AccountStatus",
    "AvailableNumber",
    "IncomingNumber",
    "NumberConfig",
    "RestRefusedError",
    "TwilioDirectory",
    "account_resource",
    "available_resource",
    "number_resource",
]

JsonObject = dict[str, Any]
AccountStatus = Literal["active", "suspended", "closed"]
HttpMethod = Literal["GET", "POST"]
_STATUSES: Final[Mapping[str, AccountStatus]] = {
    "active": "active",
    "suspended": "suspended",
    "closed": "closed",
}

# Twilio's default cap on subaccounts per main account (§3).
SUBACCOUNT_LIMIT: Final = 1000
# Numbers for sale when a test adds none: fictional 555-01xx lines.
DEFAULT_INVENTORY: Final = (
    ("+14155550101", "415"),
    ("+14155550102", "415"),
    ("+14155550103", "415"),
    ("+12125550101", "212"),
    ("+12125550102", "212"),
    ("+12125550103", "212"),
)

_E164: Final = re.compile(r"\+[1-9]\d{7,14}")
_AREA_CODE: Final = re.compile(r"[2-9]\d\d")
_NANP: Final = re.compile(r"\+1(\d{3})(\d{3})(\d{4})")


class RestRefusedError(PeerError):
    """A request the fake answers with a Twilio error instead of a resource."""

    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _now_utc() -> datetime:
    return datetime.now(UTC)


def _rfc2822(moment: datetime) -> str:
    return email.utils.format_datetime(moment)


def _display(phone_number: str) -> str:
    """Twilio's friendly name for a number: (415) 555-0101 for NANP ones."""
    match = _NANP.fullmatch(phone_number)
    if match is None:
        return phone_number
    area, exchange, line = match.groups()
    return f"({area}) {exchange}-{line}"


@dataclass(slots=True)
class AccountRecord:
    """An account the fake knows; a main account is its own owner."""

    account: TwilioAccount
    owner_account_sid: str
    friendly_name: str
    status: AccountStatus = "active"
    created_at_utc: datetime = field(default_factory=_now_utc)
    updated_at_utc: datetime = field(default_factory=_now_utc)

    @property
    def sid(self) -> str:
        return self.account.sid

    @property
    def is_main(self) -> bool:
        return self.owner_account_sid == self.account.sid


@dataclass(frozen=True, slots=True)
class AvailableNumber:
    """A number for sale, and the area code a search finds it under."""

    phone_number: str
    area_code: str


@dataclass(slots=True)
class IncomingNumber:
    """A bought number: its PN sid, owner and voice configuration."""

    sid: str
    phone_number: str
    account_sid: str
    voice_url: str = ""
    voice_method: HttpMethod = "POST"
    status_callback: str = ""
    status_callback_method: HttpMethod = "POST"
    friendly_name: str = ""
    created_at_utc: datetime = field(default_factory=_now_utc)
    updated_at_utc: datetime = field(default_factory=_now_utc)


def _method(form: Mapping[str, str], name: str) -> HttpMethod | None:
    value = form.get(name)
    if value is None:
        return None
    upper = value.upper()
    if upper == "GET":
        return "GET"
    if upper == "POST":
        return "POST"
    raise RestRefusedError(400, 20001, f"{name} must be GET or POST")


@dataclass(frozen=True, slots=True)
class NumberConfig:
    """The voice settings a create or update names; None leaves one unchanged."""

    voice_url: str | None = None
    voice_method: HttpMethod | None = None
    status_callback: str | None = None
    status_callback_method: HttpMethod | None = None
    friendly_name: str | None = None

    @classmethod
    def from_form(cls, form: Mapping[str, str]) -> "NumberConfig":
        """Read Twilio's form names; a method other than GET or POST is refused."""
        return cls(
            voice_url=form.get("VoiceUrl"),
            voice_method=_method(form, "VoiceMethod"),
            status_callback=form.get("StatusCallback"),
            status_callback_method=_method(form, "StatusCallbackMethod"),
            friendly_name=form.get("FriendlyName"),
        )

    def apply(self, number: IncomingNumber) -> None:
        if self.voice_url is not None:
            number.voice_url = self.voice_url
        if self.voice_method is not None:
            number.voice_method = self.voice_method
        if self.status_callback is not None:
            number.status_callback = self.status_callback
        if self.status_callback_method is not None:
            number.status_callback_method = self.status_callback_method
        if self.friendly_name is not None:
            number.friendly_name = self.friendly_name


def _phone_filter(pattern: str) -> re.Pattern[str]:
    """Twilio's PhoneNumber list filter: a partial number, * for any one digit."""
    parts = (r"\d" if char == "*" else re.escape(char) for char in pattern)
    return re.compile("".join(parts))


class TwilioDirectory:
    """Accounts, the numbers each owns, and the numbers still for sale.

    Every method either changes the state and returns the record, or raises
    RestRefusedError carrying the answer Twilio would give. Released numbers do
    not return to sale: Twilio holds them back for a while, so a test that wants
    one again calls add_available.
    """

    def __init__(self, subaccount_limit: int = SUBACCOUNT_LIMIT) -> None:
        self.subaccount_limit = subaccount_limit
        self._accounts: dict[str, AccountRecord] = {}
        self._numbers: dict[str, IncomingNumber] = {}
        self._for_sale: dict[str, AvailableNumber] = {}
        for phone_number, area_code in DEFAULT_INVENTORY:
            self.add_available(phone_number, area_code)

    # Accounts ---------------------------------------------------------------

    def add_main(self, account: TwilioAccount) -> None:
        """Know account as a main account, unless its sid is known already."""
        known = self._accounts.get(account.sid)
        if known is None:
            self._accounts[account.sid] = AccountRecord(
                account, owner_account_sid=account.sid, friendly_name=account.sid
            )
        elif known.account.auth_token != account.auth_token:
            raise PeerStateError(f"account {account.sid} is known with another token")

    def account(self, sid: str) -> AccountRecord | None:
        return self._accounts.get(sid)

    def subaccounts(self) -> dict[str, TwilioAccount]:
        """Every subaccount ever created, closed ones included, by sid."""
        return {
            sid: record.account
            for sid, record in self._accounts.items()
            if not record.is_main
        }

    def authenticate(self, login: str, password: str) -> AccountRecord | None:
        """The active account whose sid and auth token these are, else None."""
        record = self._accounts.get(login)
        if record is None or record.status != "active":
            return None
        if not hmac.compare_digest(password, record.account.auth_token):
            return None
        return record

    def may_act_on(self, caller: AccountRecord, target_sid: str) -> bool:
        """Whether caller's credentials reach target's resources (§3, Auth)."""
        target = self._accounts.get(target_sid)
        if target is None:
            return False
        return target.sid == caller.sid or (
            caller.is_main and target.owner_account_sid == caller.sid
        )

    def visible_to(self, caller: AccountRecord) -> list[AccountRecord]:
        """The accounts a list of /Accounts shows: the caller and its children."""
        return [
            record
            for record in self._accounts.values()
            if self.may_act_on(caller, record.sid)
        ]

    def create_subaccount(
        self, caller: AccountRecord, friendly_name: str | None
    ) -> AccountRecord:
        if not caller.is_main:
            raise RestRefusedError(403, 20006, "subaccounts cannot create accounts")
        children = sum(
            1
            for record in self._accounts.values()
            if not record.is_main and record.owner_account_sid == caller.sid
        )
        if children >= self.subaccount_limit:
            message = "Maximum number of subaccounts reached"
            raise RestRefusedError(400, 21480, message)
        now = _now_utc()
        if friendly_name is None:
            stamp = now.strftime("%Y-%m-%d %I:%M %p").lower()
            friendly_name = f"SubAccount Created at {stamp}"
        record = AccountRecord(
            new_account(),
            owner_account_sid=caller.sid,
            friendly_name=friendly_name,
            created_at_utc=now,
            updated_at_utc=now,
        )
        self._accounts[record.sid] = record
        return record

    def update_account(
        self,
        caller: AccountRecord,
        target: AccountRecord,
        status: str | None,
        friendly_name: str | None,
    ) -> AccountRecord:
        """Rename and/or change Status; closing releases every number (§3, Close)."""
        wanted = None if status is None else self._status_change(caller, target, status)
        if friendly_name is not None:
            target.friendly_name = friendly_name
        if wanted is not None and wanted != target.status:
            target.status = wanted
            if wanted == "closed":
                for number in self.numbers_of(target.sid):
                    self.release(number)
        target.updated_at_utc = _now_utc()
        return target

    def _status_change(
        self, caller: AccountRecord, target: AccountRecord, status: str
    ) -> AccountStatus:
        if not caller.is_main:
            message = "only the main account can change an account's status"
            raise RestRefusedError(403, 20006, message)
        if target.is_main:
            message = "Unable to update Status for parent accounts"
            raise RestRefusedError(400, 21477, message)
        wanted = _STATUSES.get(status)
        if wanted is None:
            message = f"Status must be active, suspended or closed, not {status}"
            raise RestRefusedError(400, 21100, message)
        if target.status == "closed" and wanted != "closed":
            raise RestRefusedError(400, 21100, "a closed account cannot be reopened")
        return wanted

    # Numbers for sale -------------------------------------------------------

    def add_available(self, phone_number: str, area_code: str) -> None:
        match = _NANP.fullmatch(phone_number)
        if match is None or match.group(1) != area_code:
            raise ValueError(f"{phone_number} is not a +1 number in {area_code}")
        if self.owned(phone_number) is not None:
            raise PeerStateError(f"{phone_number} is owned, so not for sale")
        self._for_sale[phone_number] = AvailableNumber(phone_number, area_code)

    def search(self, area_code: str | None, limit: int) -> list[AvailableNumber]:
        """Numbers for sale, in the order they were added."""
        if area_code is not None:
            _check_area_code(area_code)
        found = [
            number
            for number in self._for_sale.values()
            if area_code is None or number.area_code == area_code
        ]
        return found[:limit]

    # Owned numbers ----------------------------------------------------------

    def buy(
        self,
        account: AccountRecord,
        phone_number: str | None,
        area_code: str | None,
        config: NumberConfig,
    ) -> IncomingNumber:
        """Move a number from sale into account, configured as config says."""
        if account.status != "active":
            raise RestRefusedError(400, 20005, "Account not active")
        chosen = self._choose(phone_number, area_code)
        del self._for_sale[chosen.phone_number]
        number = IncomingNumber(
            sid="PN" + secrets.token_hex(16),
            phone_number=chosen.phone_number,
            account_sid=account.sid,
            friendly_name=_display(chosen.phone_number),
        )
        config.apply(number)
        self._numbers[number.sid] = number
        return number

    def _choose(
        self, phone_number: str | None, area_code: str | None
    ) -> AvailableNumber:
        if phone_number is not None:
            if _E164.fullmatch(phone_number) is None:
                raise RestRefusedError(400, 21421, "PhoneNumber is invalid")
            chosen = self._for_sale.get(phone_number)
            if chosen is None:
                message = f"{phone_number} is not available"
                raise RestRefusedError(400, 21422, message)
            return chosen
        if area_code is not None:
            found = self.search(area_code, limit=1)
            if not found:
                message = f"No phone numbers found in area code {area_code}"
                raise RestRefusedError(400, 21452, message)
            return found[0]
        message = "A PhoneNumber or AreaCode is required"
        raise RestRefusedError(400, 20001, message)

    def number(self, account_sid: str, number_sid: str) -> IncomingNumber:
        """The number with this PN sid if account_sid owns it; 20404 otherwise."""
        number = self._numbers.get(number_sid)
        if number is None or number.account_sid != account_sid:
            message = f"IncomingPhoneNumber {number_sid} was not found"
            raise RestRefusedError(404, 20404, message)
        return number

    def numbers_of(
        self, account_sid: str, phone_filter: str | None = None
    ) -> list[IncomingNumber]:
        pattern = None if phone_filter is None else _phone_filter(phone_filter)
        return [
            number
            for number in self._numbers.values()
            if number.account_sid == account_sid
            and (pattern is None or pattern.search(number.phone_number))
        ]

    def owned(self, phone_number: str) -> IncomingNumber | None:
        """The bought number with this E.164 form, whoever owns it."""
        for number in self._numbers.values():
            if number.phone_number == phone_number:
                return number
        return None

    def update_number(
        self,
        caller: AccountRecord,
        number: IncomingNumber,
        new_owner_sid: str | None,
        config: NumberConfig,
    ) -> IncomingNumber:
        """Reconfigure number and, with AccountSid, transfer it (§3, Transfer).

        A refused transfer changes nothing, configuration included.
        """
        if new_owner_sid is not None and new_owner_sid != number.account_sid:
            self._check_transfer(caller, new_owner_sid)
            number.account_sid = new_owner_sid
        config.apply(number)
        number.updated_at_utc = _now_utc()
        return number

    def _check_transfer(self, caller: AccountRecord, new_owner_sid: str) -> None:
        if not caller.is_main:
            message = "API User must be the parent account to transfer phone numbers."
            raise RestRefusedError(400, 21474, message)
        # The current owner is in the caller's family, or the caller could not
        # have reached the number; so "related" means "in the same family".
        if not self.may_act_on(caller, new_owner_sid):
            message = (
                "AccountSid you are transferring to is not related to the "
                "originating owner of the phone number"
            )
            raise RestRefusedError(400, 21473, message)
        new_owner = self._accounts[new_owner_sid]
        if new_owner.status != "active":
            raise RestRefusedError(400, 21472, "Account is not active")

    def release(self, number: IncomingNumber) -> None:
        del self._numbers[number.sid]


def _check_area_code(area_code: str) -> None:
    if _AREA_CODE.fullmatch(area_code) is None:
        raise RestRefusedError(400, 21451, f"Invalid area code {area_code}")


# Resources as Twilio renders them ---------------------------------------------


def account_resource(record: AccountRecord) -> JsonObject:
    base = f"/{API_VERSION}/Accounts/{record.sid}"
    return {
        "auth_token": record.account.auth_token,
        "date_created": _rfc2822(record.created_at_utc),
        "date_updated": _rfc2822(record.updated_at_utc),
        "friendly_name": record.friendly_name,
        "owner_account_sid": record.owner_account_sid,
        "sid": record.sid,
        "status": record.status,
        "subresource_uris": {
            "available_phone_numbers": f"{base}/AvailablePhoneNumbers.json",
            "calls": f"{base}/Calls.json",
            "incoming_phone_numbers": f"{base}/IncomingPhoneNumbers.json",
        },
        "type": "Full",
        "uri": f"{base}.json",
    }


def available_resource(number: AvailableNumber) -> JsonObject:
    return {
        "friendly_name": _display(number.phone_number),
        "phone_number": number.phone_number,
        "lata": None,
        "locality": None,
        "rate_center": None,
        "latitude": None,
        "longitude": None,
        "region": None,
        "postal_code": None,
        "iso_country": "US",
        "address_requirements": "none",
        "beta": False,
        "capabilities": {"voice": True, "SMS": True, "MMS": True, "fax": False},
    }


def number_resource(number: IncomingNumber) -> JsonObject:
    uri = f"/{API_VERSION}/Accounts/{number.account_sid}/IncomingPhoneNumbers"
    return {
        "sid": number.sid,
        "account_sid": number.account_sid,
        "phone_number": number.phone_number,
        "friendly_name": number.friendly_name,
        "api_version": API_VERSION,
        "date_created": _rfc2822(number.created_at_utc),
        "date_updated": _rfc2822(number.updated_at_utc),
        "voice_url": number.voice_url,
        "voice_method": number.voice_method,
        "voice_fallback_url": "",
        "voice_fallback_method": "POST",
        "voice_application_sid": "",
        "voice_caller_id_lookup": False,
        "status_callback": number.status_callback,
        "status_callback_method": number.status_callback_method,
        "trunk_sid": None,
        "address_requirements": "none",
        "beta": False,
        "capabilities": {"voice": True, "sms": True, "mms": True, "fax": False},
        "origin": "twilio",
        "status": "in-use",
        "uri": f"{uri}/{number.sid}.json",
    }
