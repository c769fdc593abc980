"""The registrar (RFC 3261 §10.3): authenticates REGISTER requests and keeps
each extension's contact bindings, in memory and in the store so that a
restart keeps them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any

from aiosipua import SipRequest, SipResponse, parse_params

from pbx.events import EventBus
from pbx.sip.auth import AddressGuard, AuthResult, AuthStatus, DigestAuthenticator, report_refusal
from pbx.sip.messages import make_response
from pbx.store.db import Store

logger = logging.getLogger(__name__)

TABLE = "registrations"

# Digits an Expires value may have: 2**32-1 (RFC 3261 §25's delta-seconds
# bound) has ten; a longer one is an attack on the parser, not a duration.
_MAX_EXPIRES_DIGITS = 10


@dataclass
class Binding:
    """One registered contact of an extension."""

    extension: str
    contact: str  # the Contact URI as sent
    source: tuple[str, int]  # where the REGISTER came from
    transport: str  # "udp" | "tcp"
    expires_at: float  # unix time
    user_agent: str
    call_id: str
    # What qualify (pbx.sip.qualify) found: a contact that left OPTIONS
    # unanswered is not rung until it answers or registers again.
    reachable: bool = True
    rtt_ms: float | None = None  # the last OPTIONS' round trip; None before one, and while unreachable


class _BadRequest(Exception):
    """The REGISTER is malformed; the message is the 400's reason phrase."""


class Registrar:
    """Answers REGISTER requests and knows where each extension can be reached.

    ``passwords`` gives an extension's password, or None for an unknown one;
    ``max_contacts`` how many bindings it may have at once. Events:
    ``registrations_changed(count)`` after every change to the set of
    bindings or to whether one is reachable, ``auth_failure(ip, extension)``
    after every REGISTER refused for its credentials, and the
    ``auth_failure`` and ``replay`` security events.
    ``on_bound(binding)`` is called for each binding a REGISTER added or
    refreshed, once it is stored and before the 200 OK goes out: it must
    not block (message-waiting indication schedules a NOTIFY from it).
    """

    def __init__(
        self,
        passwords: Callable[[str], str | None],
        store: Store,
        authenticator: DigestAuthenticator,
        guard: AddressGuard,
        events: EventBus,
        *,
        min_expires: int = 60,
        max_expires: int = 3600,
        default_expires: int = 3600,
        clock: Callable[[], float] = time.time,
        sweep_interval: float = 5,
        max_contacts: Callable[[str], int] = lambda extension: 10,
    ) -> None:
        self.passwords = passwords
        self.max_contacts = max_contacts
        self.min_expires = min_expires
        self.max_expires = max_expires
        self.default_expires = default_expires
        self.sweep_interval = sweep_interval
        self._store = store
        self._auth = authenticator
        self._guard = guard
        self._events = events
        self._clock = clock
        # extension -> contact URI -> binding, each inner dict in order of
        # the last refresh, so the newest binding is the last one.
        self._bindings: dict[str, dict[str, Binding]] = {}
        self._sweeper: asyncio.Task[None] | None = None
        # Bindings changed but not yet written (_persist), the future of the
        # batch that will write them, and the task writing batches.
        self._dirty: dict[tuple[str, str], None] = {}
        self._batch: asyncio.Future[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self.on_bound: Callable[[Binding], None] = lambda binding: None

    async def load(self) -> None:
        """Restore the bindings that have not expired from the store and
        delete the ones that have."""
        now = self._clock()
        await self._store.delete_where(TABLE, "expires_at <= ?", [now])
        rows = await self._store.rows(TABLE, "expires_at > ?", [now])
        for row in sorted(rows, key=lambda r: r["expires_at"]):
            binding = _from_row(row)
            self._bindings.setdefault(binding.extension, {})[binding.contact] = binding
        logger.info("restored %d registrations", len(rows))
        self._changed()

    def start(self) -> None:
        """Start dropping expired bindings every ``sweep_interval`` seconds."""
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep(), name="registrar-sweep")

    async def stop(self) -> None:
        """Stop the sweep started by :meth:`start`; let the store write
        the batch of bindings in hand, before the store closes."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        if self._writer is not None:
            with contextlib.suppress(Exception):  # its REGISTERs were answered 500
                await self._writer
            self._writer = None

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval)
            try:
                await self.expire()
            except Exception:
                logger.exception("dropping expired registrations failed")

    def contacts(self, extension: str) -> list[Binding]:
        """The extension's bindings a call may ring: not expired and not
        found unreachable by qualify, newest first."""
        return [b for b in self.bindings(extension) if b.reachable]

    def bindings(self, extension: str) -> list[Binding]:
        """The extension's bindings that have not expired, reachable or not, newest first."""
        now = self._clock()
        return [b for b in reversed(self._bindings.get(extension, {}).values()) if b.expires_at > now]

    def binding(self, extension: str, contact: str) -> Binding | None:
        """The extension's binding of ``contact`` if it has not expired."""
        binding = self._bindings.get(extension, {}).get(contact)
        return binding if binding is not None and binding.expires_at > self._clock() else None

    def all_bindings(self) -> list[Binding]:
        """Every binding that has not expired, reachable or not."""
        return [b for extension in list(self._bindings) for b in self.bindings(extension)]

    def qualified(self, binding: Binding, rtt: float | None) -> None:
        """What an OPTIONS to ``binding`` found: an answer after ``rtt``
        seconds, or none (None). The answer for a binding that a REGISTER
        has replaced or removed meanwhile is dropped: that REGISTER said more."""
        if self._bindings.get(binding.extension, {}).get(binding.contact) is not binding:
            return
        binding.rtt_ms = round(rtt * 1000, 1) if rtt is not None else None
        if binding.reachable == (rtt is not None):
            return
        binding.reachable = rtt is not None
        if binding.reachable:
            logger.info("%s at %s answers OPTIONS again (%.0f ms): rung again", binding.extension, binding.contact, binding.rtt_ms)
        else:
            logger.warning("%s at %s does not answer OPTIONS: not rung until it does", binding.extension, binding.contact)
        self._changed()

    async def expire(self) -> int:
        """Drop expired bindings, here and in the store; returns how many."""
        now = self._clock()
        gone = [b for bindings in self._bindings.values() for b in bindings.values() if b.expires_at <= now]
        for binding in gone:
            self._remove(binding.extension, binding.contact)
            logger.info("registration of %s at %s expired", binding.extension, binding.contact)
        if gone:
            self._changed()
            await self._persist([(b.extension, b.contact) for b in gone])
        return len(gone)

    async def handle_register(self, request: SipRequest, source: tuple[str, int], transport: str) -> SipResponse:
        """Answer a REGISTER that arrived from ``source`` over ``transport``;
        a failure of our own is a 500, never a REGISTER left unanswered."""
        try:
            return await self._handle_register(request, source, transport)
        except Exception:
            logger.exception("REGISTER from %s:%d failed", *source[:2])
            return make_response(request, 500)

    async def _handle_register(self, request: SipRequest, source: tuple[str, int], transport: str) -> SipResponse:
        ip = source[0]
        to = request.to_addr
        extension = to.uri.user if to is not None else None
        if not extension:
            return make_response(request, 400, "Missing user in To")
        if self._guard.is_banned(ip):
            return make_response(request, 403)

        # Unknown extensions are challenged like known ones and only fail on
        # the credentials, so the answers do not reveal which ones exist.
        result = self._auth.verify(request, ip, self.passwords)
        if result.ok and result.username != extension:
            result = AuthResult(AuthStatus.FAILED, result.username, f"authenticated as {result.username}")
        if result.status in (AuthStatus.FAILED, AuthStatus.REPLAY):
            report_refusal(result, ip, "REGISTER", guard=self._guard, events=self._events, extension=extension)
        if result.status is AuthStatus.FAILED:
            return make_response(request, 403)
        if not result.ok:
            # A replayed REGISTER (a foreign Contact, or `Contact: *` to wipe
            # the phone's bindings) changes nothing: like a stale nonce, it
            # gets a fresh challenge that only the password can answer.
            response = make_response(request, 401)
            stale = result.status is not AuthStatus.MISSING
            for challenge in self._auth.challenge_headers(ip, stale=stale, user=extension):
                response.headers.append("WWW-Authenticate", challenge)
            return response

        try:
            changes = self._requested_changes(request)
        except _BadRequest as exc:
            return make_response(request, 400, str(exc))
        if any(0 < expires < self.min_expires for _, expires in changes):
            return make_response(request, 423, headers={"Min-Expires": str(self.min_expires)})
        limit = self.max_contacts(extension)
        if self._would_exceed(extension, changes, limit):
            # Refused whole, as Kamailio's registrar does: evicting the oldest
            # binding instead (Asterisk's remove_existing) would let whoever
            # registers most often push the extension's own phones out.
            logger.warning("REGISTER for %s from %s refused: more than %d contacts", extension, ip, limit)
            return make_response(request, 503, "Too many registered contacts")

        now = self._clock()
        touched = []
        bound = []
        changed = False  # in the set of bindings, or in whether one is reachable
        for contact, expires in changes:
            if contact == "*":
                contacts = list(self._bindings.get(extension, {}))
                for uri in contacts:
                    self._remove(extension, uri)
                touched += [(extension, uri) for uri in contacts]
                logger.info("%s unregistered all contacts", extension)
            elif expires == 0:
                if self._remove(extension, contact) is not None:
                    touched.append((extension, contact))
                    logger.info("%s unregistered %s", extension, contact)
            else:
                binding = Binding(
                    extension=extension,
                    contact=contact,
                    source=source,
                    transport=transport.lower(),
                    expires_at=now + min(expires, self.max_expires),
                    user_agent=request.headers.get_first("User-Agent") or "",
                    call_id=request.call_id or "",
                )
                changed = self._add(binding) or changed
                bound.append(binding)
                touched.append((extension, contact))
        changed = changed or len(touched) > len(bound)  # some removed
        if changed:
            self._changed()
        if touched:
            await self._persist(touched)
        for binding in bound:
            self.on_bound(binding)

        response = make_response(request, 200, headers={"Date": formatdate(now, usegmt=True)})
        for binding in self.bindings(extension):
            remaining = max(0, math.ceil(binding.expires_at - now))
            response.headers.append("Contact", f"<{binding.contact}>;expires={remaining}")
        return response

    def _would_exceed(self, extension: str, changes: list[tuple[str, int]], limit: int) -> bool:
        """Whether applying ``changes`` adds a contact and leaves the extension
        with more than ``limit`` bindings. Refreshing bindings that exist is
        always allowed, so a limit lowered by a reload strands no phone."""
        current = {b.contact for b in self.bindings(extension)}
        after = set(current)
        for contact, expires in changes:
            if contact == "*":
                after.clear()
            elif expires == 0:
                after.discard(contact)
            else:
                after.add(contact)
        return len(after) > limit and not after <= current

    def _requested_changes(self, request: SipRequest) -> list[tuple[str, int]]:
        """(contact URI or "*", requested expires) for each Contact of the
        REGISTER (RFC 3261 §10.3 steps 6 and 7)."""
        header_expires = _expires(request.headers.get_first("Expires"))
        changes = []
        for value in request.headers.get("Contact"):
            if value.strip() == "*":
                changes.append(("*", header_expires if header_expires is not None else -1))
                continue
            uri, params = _split_contact(value)
            if not uri.lower().startswith(("sip:", "sips:")):
                raise _BadRequest("Bad Contact")
            expires = _expires(params.get("expires"))
            if expires is None:
                expires = header_expires if header_expires is not None else self.default_expires
            changes.append((uri, expires))
        if any(contact == "*" for contact, _ in changes) and changes != [("*", 0)]:
            raise _BadRequest("Contact * needs Expires: 0 and no other Contact")
        return changes

    def _add(self, binding: Binding) -> bool:
        """Add or refresh ``binding``; whether that changed the set of
        bindings or made a contact reachable again (a plain refresh, the
        bulk of all REGISTERs, does neither)."""
        bindings = self._bindings.setdefault(binding.extension, {})
        old = bindings.pop(binding.contact, None)
        if old is not None and (old.source, old.transport) == (binding.source, binding.transport):
            binding.rtt_ms = old.rtt_ms  # the same path: its last round trip still tells
        bindings[binding.contact] = binding
        if old is not None and old.reachable and old.expires_at > self._clock():
            return False
        if old is None:
            logger.info(
                "%s registered %s from %s:%d/%s",
                binding.extension,
                binding.contact,
                binding.source[0],
                binding.source[1],
                binding.transport,
            )
        return True

    def _remove(self, extension: str, contact: str) -> Binding | None:
        bindings = self._bindings.get(extension, {})
        binding = bindings.pop(contact, None)
        if not bindings:
            self._bindings.pop(extension, None)
        return binding

    def _changed(self) -> None:
        self._events.emit("registrations_changed", count=sum(map(len, self._bindings.values())))

    async def _persist(self, keys: list[tuple[str, str]]) -> None:
        """Write the current state of the bindings under ``keys`` to the
        store; return once it is committed.

        Writes are grouped: REGISTERs that arrive while a batch is being
        written wait for the next batch, which writes all of them in one
        transaction, so a burst of registrations costs one commit (and one
        trip to the store's thread) per batch rather than one per REGISTER.
        What is written is what memory holds when the batch is taken, which
        keeps the store right when REGISTERs for the same contact interleave.
        """
        for key in keys:
            self._dirty[key] = None
        if self._batch is None:
            self._batch = asyncio.get_running_loop().create_future()
        batch = self._batch
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_batches(), name="registrar-store")
        await asyncio.shield(batch)

    async def _write_batches(self) -> None:
        while self._dirty and self._batch is not None:
            keys, batch = list(self._dirty), self._batch
            self._dirty.clear()
            self._batch = None
            rows, gone = [], []
            for extension, contact in keys:
                binding = self._bindings.get(extension, {}).get(contact)
                if binding is None:
                    gone.append((extension, contact))
                else:
                    rows.append(_to_row(binding))
            try:
                await self._store.run(self._write, rows, gone)
            except Exception as exc:
                batch.set_exception(exc)
                batch.exception()  # retrieved: a batch nobody awaits any more is no "never retrieved" warning
            else:
                batch.set_result(None)

    def _write(self, rows: list[dict[str, Any]], gone: list[tuple[str, str]]) -> None:
        """One batch, in one transaction (on the store's thread)."""
        conn = self._store.db.conn
        with conn:
            conn.executemany(f"delete from {TABLE} where extension = ? and contact = ?", gone)
            if rows:
                columns = ", ".join(rows[0])
                marks = ", ".join("?" * len(rows[0]))
                conn.executemany(f"insert or replace into {TABLE} ({columns}) values ({marks})", [tuple(r.values()) for r in rows])


def _split_contact(value: str) -> tuple[str, dict[str, str | None]]:
    """A Contact value's URI (as sent) and its header parameters.

    Without angle brackets every ``;param`` belongs to the header, not the
    URI (RFC 3261 §20.10), which aiosipua's parse_address does not do."""
    lt = value.find("<")
    if lt != -1:
        gt = value.find(">", lt)
        if gt == -1:
            raise _BadRequest("Bad Contact")
        rest = value[gt + 1 :].strip()
        return value[lt + 1 : gt].strip(), parse_params(rest[1:] if rest.startswith(";") else "")
    uri, _, params = value.partition(";")
    return uri.strip(), parse_params(params)


def _expires(value: str | None) -> int | None:
    """An Expires value in seconds; None when absent. Malformed values count
    as 3600 (RFC 3261 §20.19); digits past 2**32-1 are a bad request."""
    if value is None:
        return None
    value = value.strip()
    if not (value.isascii() and value.isdigit()):
        return 3600
    digits = value.lstrip("0") or "0"
    if len(digits) > _MAX_EXPIRES_DIGITS or int(digits) > 2**32 - 1:
        raise _BadRequest("Bad Expires")
    return int(digits)


def _to_row(binding: Binding) -> dict[str, Any]:
    host, port = binding.source
    return {
        "extension": binding.extension,
        "contact": binding.contact,
        "source": f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
        "transport": binding.transport,
        "expires_at": binding.expires_at,
        "user_agent": binding.user_agent,
        "call_id": binding.call_id,
    }


def _from_row(row: dict[str, Any]) -> Binding:
    host, _, port = row["source"].rpartition(":")
    return Binding(
        extension=row["extension"],
        contact=row["contact"],
        source=(host.strip("[]"), int(port)),
        transport=row["transport"],
        expires_at=row["expires_at"],
        user_agent=row["user_agent"],
        call_id=row["call_id"],
    )
