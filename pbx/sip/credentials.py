"""The server as a digest client (RFC 3261 §22.2, RFC 8760): what it answers a
provider's 401 or 407 with, when it registers or calls out through a trunk.

A provider may offer several challenges, one per algorithm, in its order of
preference; the server answers the first one in an algorithm the trunk allows
(``trunks.NAME.auth_algorithms``, like Asterisk's ``supported_algorithms_uac``),
so an admin can refuse to send MD5 digests to a provider that still offers it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from aiosipua import SipDigestAuth, SipResponse, parse_auth, stringify_auth
from aiosipua.auth import build_credentials

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Credentials:
    """A trunk's username and password, and the digest algorithms it may use."""

    username: str
    password: str
    algorithms: tuple[str, ...] = ("SHA-256", "MD5")

    def answer(self, response: SipResponse, method: str, uri: str) -> tuple[str, str] | None:
        """The header (Authorization for a 401, Proxy-Authorization for a 407)
        that answers the first of ``response``'s challenges we may answer, for
        a ``method`` request to ``uri``; None when there is none."""
        proxy = response.status_code == 407
        offered = []
        for raw in response.headers.get("Proxy-Authenticate" if proxy else "WWW-Authenticate"):
            challenge = parse_auth(raw)
            algorithm = challenge.params.get("algorithm", "MD5").upper()
            offered.append(algorithm)
            if algorithm not in self.algorithms:
                continue
            credentials = build_credentials(SipDigestAuth(self.username, self.password), challenge, method, uri)
            if credentials is not None:
                return "Proxy-Authorization" if proxy else "Authorization", stringify_auth(credentials)
        logger.warning("%s for %s: no challenge we can answer (offered %s, allowed %s)", method, self.username, offered, list(self.algorithms))
        return None
