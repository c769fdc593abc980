"""SIP methods: the ones the server knows, and the answer to a request whose
method it does not handle where the request arrived (RFC 3261 §8.2.1).

A phone that sends REFER, MESSAGE or PUBLISH and gets 200 believes the server
did what it asked; so a method the server knows but does not do there gets
405 Method Not Allowed and one it has never heard of 501 Not Implemented,
each with the ``Allow`` header of what it does handle there. What a dialog
handles is listed once, in :attr:`pbx.sip.dialog.Leg.HANDLERS`.
"""

from __future__ import annotations

from collections.abc import Iterable

from pbx.sip.transactions import ServerTransaction

# Every method in IANA's registry of SIP methods (RFC 3261, 3262, 3311, 3428,
# 3515, 3903, 6086, 6665): one of these the server does not do is 405, anything else 501.
KNOWN = frozenset(
    {"ACK", "BYE", "CANCEL", "INFO", "INVITE", "MESSAGE", "NOTIFY", "OPTIONS", "PRACK", "PUBLISH", "REFER", "REGISTER", "SUBSCRIBE", "UPDATE"}
)


def allow_header(methods: Iterable[str]) -> str:
    """An ``Allow`` value: ``methods`` in their order, each once."""
    return ", ".join(dict.fromkeys(methods))


def refuse(txn: ServerTransaction, allow: str) -> None:
    """Answer ``txn``'s request, of a method not handled where it came, with
    405 (a known method) or 501 (an unknown one), listing ``allow``."""
    status = 405 if txn.request.method.upper() in KNOWN else 501
    txn.reply(status, headers={"Allow": allow})
