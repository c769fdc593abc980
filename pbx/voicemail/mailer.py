"""E-mails a voicemail, WAV attached, through the ``smtp`` server of pbx.yaml.

One call sends one message and either succeeds or raises `MailError`; there
is no retrying here, because only the caller (the voicemail service) knows
whether the message is still worth sending and keeps it until it is.
"""

from __future__ import annotations

import asyncio
import logging
import re
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path

import aiosmtplib

from pbx.config.model import SmtpConfig

log = logging.getLogger(__name__)

# Caller IDs come from SIP headers anyone can write; a CR/LF in one would make
# EmailMessage refuse the Subject (or, with a laxer library, inject headers).
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


class MailError(Exception):
    """The message was not sent; the text says why (refused connection, login,
    recipient, timeout...). Sending again later may succeed."""


async def send_voicemail(
    smtp: SmtpConfig,
    to: str,
    *,
    mailbox: str,
    caller: str,
    received: str,
    seconds: float,
    wav: Path,
    timeout: float = 30,
) -> None:
    """E-mail the voicemail in ``wav`` to ``to``; raise MailError if it was not sent.

    ``received`` is shown as written; ``timeout`` bounds the whole exchange with
    the server, in seconds. A ``wav`` that cannot be read raises its OSError
    unchanged: sending again would not help.
    """
    audio = await asyncio.to_thread(wav.read_bytes)
    message = _compose(smtp.sender, to, mailbox=mailbox, caller=caller, received=received, seconds=seconds)
    message.add_attachment(audio, maintype="audio", subtype="wav", filename=wav.name)

    login = smtp.username is not None and smtp.password is not None
    if not login and (smtp.username is not None or smtp.password is not None):
        log.warning("smtp: only one of username and password is set; sending without logging in")
    server = f"[{smtp.host}]:{smtp.port}" if ":" in smtp.host else f"{smtp.host}:{smtp.port}"
    try:
        # aiosmtplib's timeout is per command; the outer one bounds the whole send.
        async with asyncio.timeout(timeout):
            await aiosmtplib.send(
                message,
                sender=smtp.sender,
                recipients=[to],
                hostname=smtp.host,
                port=smtp.port,
                start_tls=smtp.starttls,  # False: plain text, not "TLS if offered"
                username=smtp.username if login else None,
                password=smtp.password if login else None,
                timeout=timeout,
            )
    except aiosmtplib.SMTPRecipientsRefused as exc:
        refusals = "; ".join(f"{r.code} {r.message}" for r in exc.recipients)
        raise MailError(f"SMTP server {server} refused recipient {to}: {refusals}") from exc
    except aiosmtplib.SMTPAuthenticationError as exc:
        raise MailError(f"SMTP server {server} refused the login of {smtp.username}: {exc.code} {exc.message}") from exc
    except aiosmtplib.SMTPSenderRefused as exc:
        raise MailError(f"SMTP server {server} refused sender {smtp.sender}: {exc.code} {exc.message}") from exc
    except aiosmtplib.SMTPResponseException as exc:
        raise MailError(f"SMTP server {server} answered {exc.code} {exc.message}") from exc
    except TimeoutError as exc:  # before OSError: aiosmtplib's timeouts are both
        raise MailError(f"SMTP server {server} did not answer within {timeout:g} s") from exc
    except (aiosmtplib.SMTPException, OSError) as exc:
        raise MailError(f"sending through SMTP server {server} failed: {exc}") from exc
    log.info("voicemail of mailbox %s from %s e-mailed to %s", mailbox, caller, to)


def _compose(sender: str, to: str, *, mailbox: str, caller: str, received: str, seconds: float) -> EmailMessage:
    caller = _CONTROL.sub(" ", caller).strip() or "unknown"
    mailbox = _CONTROL.sub(" ", mailbox).strip()
    message = EmailMessage()
    message["From"] = sender
    message["To"] = to
    message["Subject"] = f"New voicemail from {caller} in mailbox {mailbox} ({seconds:.0f} s)"
    message["Date"] = formatdate(localtime=True)
    # An explicit domain: make_msgid's default asks DNS for this host's name, on the loop.
    message["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2] or "localhost")
    message.set_content(
        f"You have a new voicemail in mailbox {mailbox}.\n"
        "\n"
        f"From:     {caller}\n"
        f"Received: {_CONTROL.sub(' ', received)}\n"
        f"Length:   {seconds:.0f} s\n"
        "\n"
        "The recording is attached.\n"
    )
    return message
