"""How a call leg sounded: an estimated MOS from its packet loss and jitter.

A simplified ITU-T G.107 E-model, the kind a media server can afford at the
end of every call (it sees loss and jitter of what it receives, what the
phones' RTCP reports say of what they receive, nothing of their acoustics or
echo):

    R = 93.2 - Id - Ie,eff

- 93.2 is G.107's R for its default values (Ro - Is with no echo, no
  noise); the advantage factor A is 0.
- ``Id``, the delay impairment, uses Cole & Rosenbluth's fit of G.107's Id for
  those defaults ("Voice over IP performance monitoring", ACM CCR 31(2), 2001):
  ``0.024 d + 0.11 (d - 177.3)`` for the part above 177.3 ms. The one-way delay
  ``d`` is what this leg adds that we can see: a jitter buffer of twice the
  jitter, one packet of packetization, the codec's own delay, and half the
  round trip to the phone when its RTCP reports let us time one (else the
  network's delay is unknown to a relay and left out).
- ``Ie,eff = Ie + (95 - Ie) Ppl / (Ppl + Bpl)``, G.107's formula with
  BurstR = 1 (random loss), ``Ppl`` the loss in percent.
- MOS from R by G.107 Annex B, clamped to 1..4.5.

Codec values (G.113 Appendix I):

- G.711: Ie = 0 and Bpl = 25.1, the value for G.711 *with* packet loss
  concealment (G.711 Appendix I). Without concealment G.113 gives 4.3, but
  every phone this server meets conceals loss (pjsip, Asterisk and the usual
  desk phones all run a PLC on G.711), so 4.3 would rate a 1% loss as a
  0.6-point MOS drop nobody hears.
- G.722: wideband values live on G.107.1's scale, whose ceiling is
  Ro,wb = 129 (narrowband G.711 sits around 93 there). G.113's
  Ie,wb = 13 for G.722 at 64 kbit/s says that clean G.722 is near the top of
  that scale the way clean G.711 is at the top of the narrowband one, and this
  MOS is on the narrowband 1..4.5 scale, which cannot show the wideband gain.
  So G.722 gets Ie = 0 here, and its loss term keeps the wideband proportion:
  ``(129 - 13) Ppl / (Ppl + Bpl)`` out of 116 is nearly ``95 Ppl / (Ppl + Bpl)``
  out of 93.2. Its Bpl of 20 stands for G.722 with a G.722 Appendix III/IV
  concealment, a little less robust to loss than G.711 with its PLC; it was
  not checked against G.113's wideband table in this project, so treat it
  as a planning guess and correct it here if you have the table.
  Its delay adds 1.5 ms (the QMF filter bank's algorithmic delay).
- Any other codec is rated as G.711.

These are pure functions: ``estimate_mos`` is what the B2BUA calls once per
finished leg and direction: inbound from the loss and jitter we measured of
what the phone sent us, outbound from what the phone's RTCP receiver reports
say of what we sent it.
"""

from __future__ import annotations

from dataclasses import dataclass

R_DEFAULT = 93.2
"""G.107's transmission rating for its default values: the best a leg can get here."""
MOS_MIN = 1.0
MOS_MAX = 4.5


@dataclass(frozen=True, slots=True)
class CodecImpairment:
    """E-model values of one codec: equipment impairment, loss robustness, own delay."""

    ie: float  # Ie, equipment impairment factor
    bpl: float  # Bpl, packet-loss robustness factor
    delay_ms: float = 0.0  # algorithmic delay (look-ahead, filter banks)


G711 = CodecImpairment(ie=0.0, bpl=25.1)
G722 = CodecImpairment(ie=0.0, bpl=20.0, delay_ms=1.5)

IMPAIRMENTS: dict[str, CodecImpairment] = {"PCMU": G711, "PCMA": G711, "G722": G722}
"""By upper-case SDP encoding name; codecs not listed are rated as G.711."""


def impairment(codec: str) -> CodecImpairment:
    """The E-model values for an SDP encoding name (G.711's when unknown)."""
    return IMPAIRMENTS.get(codec.upper(), G711)


def delay_impairment(delay_ms: float) -> float:
    """Id for a one-way delay in ms (Cole & Rosenbluth's fit of G.107)."""
    d = max(delay_ms, 0.0)
    return 0.024 * d + (0.11 * (d - 177.3) if d > 177.3 else 0.0)


def effective_equipment_impairment(loss_percent: float, codec: CodecImpairment) -> float:
    """Ie,eff for random packet loss (BurstR = 1) of ``loss_percent`` (0-100)."""
    ppl = min(max(loss_percent, 0.0), 100.0)
    return codec.ie + (95.0 - codec.ie) * ppl / (ppl + codec.bpl)


def r_factor(loss_percent: float, delay_ms: float, codec: CodecImpairment = G711) -> float:
    """R = 93.2 - Id - Ie,eff."""
    return R_DEFAULT - delay_impairment(delay_ms) - effective_equipment_impairment(loss_percent, codec)


def mos_from_r(r: float) -> float:
    """G.107 Annex B: the estimated MOS (conversational quality) of rating R, within 1..4.5."""
    if r <= 0.0:
        return MOS_MIN
    if r >= 100.0:
        return MOS_MAX
    mos = 1.0 + 0.035 * r + r * (r - 60.0) * (100.0 - r) * 7.0e-6
    return min(max(mos, MOS_MIN), MOS_MAX)


def mouth_to_ear_delay(jitter_ms: float, ptime_ms: float, codec: CodecImpairment = G711, rtt_ms: float = 0.0) -> float:
    """The delay this leg adds that a relay can estimate: a jitter buffer of
    twice the jitter, one packet of packetization, the codec's own delay,
    half the round trip."""
    return 2.0 * max(jitter_ms, 0.0) + ptime_ms + codec.delay_ms + max(rtt_ms, 0.0) / 2.0


def estimate_mos(codec: str, loss_fraction: float, jitter_ms: float, ptime_ms: float = 20.0, rtt_ms: float = 0.0) -> float:
    """The estimated MOS (1..4.5) of a leg that lost ``loss_fraction`` (0..1) of
    its packets with interarrival jitter ``jitter_ms``, in codec ``codec``
    (SDP encoding name) with ``ptime_ms`` per packet, ``rtt_ms`` from the
    phone and back (0: unknown)."""
    values = impairment(codec)
    delay = mouth_to_ear_delay(jitter_ms, ptime_ms, values, rtt_ms)
    return mos_from_r(r_factor(100.0 * loss_fraction, delay, values))
