"""The server's one error hierarchy.

Every error a feature raises for a caller of the admin API to see is a
:class:`PbxError`: it carries the HTTP status that answers it and the JSON
``error`` code that names it, and the HTTP error middleware
(pbx.http.server) renders it as ``{"error": CODE, "message": TEXT}``, with
``fields`` or ``errors`` when it has them. No handler maps exceptions by hand.

The subclasses say which feature refused (pbx.config.model.ConfigError is one too); their ``status`` is the usual one
for that kind of refusal and each instance may name another.
"""

from __future__ import annotations


class PbxError(Exception):
    """A refusal the API answers as it is: ``status`` and ``code`` (``error`` in the JSON)."""

    status = 400
    code = "bad-request"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status: int | None = None,
        fields: dict[str, str] | None = None,
        errors: list[str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.fields = fields
        self.errors = errors

    def body(self) -> dict[str, object]:
        """The JSON body that answers it."""
        body: dict[str, object] = {"error": self.code, "message": self.message}
        if self.fields:
            body["fields"] = self.fields
        if self.errors is not None:
            body["errors"] = self.errors
        return body


class BadRequest(PbxError):
    """A request the API cannot read: bad JSON, a bad query parameter, a body that fails its schema."""

    status = 400
    code = "bad-request"


class NotFound(PbxError):
    """Nothing by that name or id."""

    status = 404
    code = "not-found"


class CallError(PbxError):
    """A call cannot do that now (not bridged, already ended, not recording...)."""

    status = 409
    code = "call-conflict"


class QueueError(PbxError):
    """A queue, agent or callback refuses the request."""

    status = 409
    code = "queue-conflict"


class VoicemailError(PbxError):
    """A mailbox or message refuses the request."""

    status = 409
    code = "voicemail-conflict"


class RecordingError(PbxError):
    """A recording refuses the request."""

    status = 409
    code = "recording-conflict"
