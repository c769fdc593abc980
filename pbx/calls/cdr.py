"""A call's one CDR row: opened when the call is accepted, completed when it
ends (or made whole for a call the server placed that never got going), and
logged as ``event=ended`` once stored, so that whoever reads the line finds
the row. pbx.calls.journal stores them."""

from __future__ import annotations

import time
from typing import Any

from pbx.calls.model import Call, call_event
from pbx.config.model import Destination
from pbx.events import EventBus
from pbx.store.db import iso_time


def cdr_row(
    call_id: str,
    direction: str,
    caller: str,
    callee: str,
    disposition: str,
    *,
    started: float,
    answered: float | None,
    ended: float,
    queue: str | None = None,
    agent: str | None = None,
    wait: float | None = None,
    sip_call_id: str | None = None,
    hangup: str | None = None,
    reason: str | None = None,
    linked_id: str | None = None,
    transferred_by: str | None = None,
    transfer_to: str | None = None,
    picked_up_by: str | None = None,
) -> dict[str, Any]:
    return {
        "call_id": call_id,
        "direction": direction,
        "from_number": caller,
        "to_number": callee,
        "started": iso_time(started),
        "answered": iso_time(answered) if answered else None,
        "ended": iso_time(ended),
        "disposition": disposition,
        "duration": round(ended - started, 3),
        "billsec": round(ended - answered, 3) if answered else 0.0,
        "queue": queue,
        "agent": agent,
        "wait": round(wait, 3) if wait is not None else None,
        "sip_call_id": sip_call_id or None,
        "hangup": hangup,
        "reason": reason,
        "linked_id": linked_id or call_id,
        "transferred_by": transferred_by,
        "transfer_to": transfer_to,
        "picked_up_by": picked_up_by,
    }


def row_of(call: Call, disposition: str, ended: float) -> dict[str, Any]:
    """The CDR row of ``call``, ended at ``ended`` with ``disposition``."""
    return cdr_row(
        call.id, call.direction, call.caller, call.callee, disposition,
        started=call.started, answered=call.answered_at, ended=ended, queue=call.queue, agent=call.agent, wait=call.wait,
        sip_call_id=call.sip_call_id, hangup=call.hangup_by, reason=call.end_reason, linked_id=call.linked_id,
        transferred_by=call.transferred_by, transfer_to=call.transfer_to, picked_up_by=call.picked_up_by,
    )  # fmt: skip


def unconnected_row(
    events: EventBus,
    call_id: str,
    direction: str,
    extension: str,
    destination: Destination,
    disposition: str,
    started: float,
    sip_call_id: str | None = None,
) -> dict[str, Any]:
    """The CDR row of a call the server placed that never got going (the
    first phone did not answer): it has no Call, yet it rang someone. Its
    start and end are logged and counted as any call's."""
    call_event(call_id, "started", direction=direction, **{"from": extension, "to": destination.target}, destination=destination)
    events.emit("call_started", call_id=call_id, direction=direction, from_=extension, to=destination.target)
    row = cdr_row(
        call_id, direction, extension, destination.target, disposition, started=started, answered=None, ended=time.time(),
        sip_call_id=sip_call_id,
    )  # fmt: skip
    events.emit("call_ended", call_id=call_id, direction=direction, disposition=disposition, cdr=row)
    return row


def open_row(call: Call) -> dict[str, Any]:
    """The row of ``call`` while it is in progress: no end nor disposition yet."""
    return {
        "call_id": call.id,
        "direction": call.direction,
        "from_number": call.caller,
        "to_number": call.callee,
        "started": iso_time(call.started),
        "answered": iso_time(call.answered_at) if call.answered_at else None,
        "sip_call_id": call.sip_call_id or None,
        "linked_id": call.linked_id,
        "transferred_by": call.transferred_by,
    }


def log_ended(row: dict[str, Any]) -> None:
    """The ``event=ended`` line of a stored row."""
    call_event(
        row["call_id"], "ended", disposition=row["disposition"], direction=row["direction"],
        **{"from": row["from_number"], "to": row["to_number"]}, duration=row["duration"], billsec=row["billsec"],
        queue=row["queue"], agent=row["agent"], wait=row["wait"], hangup=row["hangup"], reason=row["reason"],
        linked_id=row.get("linked_id") if row.get("linked_id") != row["call_id"] else None, transferred_by=row.get("transferred_by"),
        transfer_to=row.get("transfer_to"), picked_up_by=row.get("picked_up_by"),
    )  # fmt: skip
