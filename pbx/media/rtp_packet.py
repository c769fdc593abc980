"""RTP packets (RFC 3550 §5.1) read and patched as bytes, never parsed into objects.

The relay's receiving side (:mod:`pbx.media.relay_side`) and its sending
stream (:mod:`pbx.media.playback`) share these: the header's layout, where a
packet's payload lies, the one copy a payload type change costs, and the
structs that pack our own packets whole.
"""

from __future__ import annotations

import ipaddress
import struct

Address = tuple[str, int]
# Incoming payload type -> (outgoing payload type, translate table or None).
PayloadRule = tuple[int, bytes | None]
PayloadRules = dict[int, PayloadRule]

RTP_HEADER = 12
_SEQ_TS_SSRC = struct.Struct("!HII")  # RTP header bytes 2-11
_TIMESTAMP = struct.Struct("!I")  # RTP header bytes 4-7
# Bound methods rather than the Structs: CPython compiles a method call on a
# name bound by ``from ... import`` without its method-call fast path, which
# would cost the per-packet path a bound method object per call.
unpack_seq_ts_ssrc = _SEQ_TS_SSRC.unpack_from  # (data, 2) -> (sequence number, timestamp, SSRC)
pack_seq_ts_ssrc = _SEQ_TS_SSRC.pack_into  # (packet, 2, sequence number, timestamp, SSRC)
unpack_timestamp = _TIMESTAMP.unpack_from  # (data, 4) -> (timestamp,)
# One struct per payload size: a whole packet (version byte, marker and
# payload type, sequence, timestamp, SSRC, payload) in one pack_into call.
_PACKETS: dict[int, struct.Struct] = {}


def rewrite(data: bytes, rule: PayloadRule) -> bytearray | None:
    """A copy of RTP packet ``data`` with the payload type (and payload) changed.

    None when the header's own lengths do not fit the packet.
    """
    payload_type, table = rule
    packet = bytearray(data)
    packet[1] = (data[1] & 0x80) | payload_type  # keep the marker bit
    if table is not None:
        bounds = payload_bounds(data)
        if bounds is None:
            return None
        start, end = bounds
        packet[start:end] = data[start:end].translate(table)
    return packet


def payload_bounds(data: bytes) -> tuple[int, int] | None:
    """Where the payload of RTP packet ``data`` starts and ends.

    None when the header's own lengths do not fit the packet.
    """
    first = data[0]
    start = RTP_HEADER + 4 * (first & 0x0F)  # CSRCs
    if first & 0x10:  # header extension: 4-byte head, then its length in words
        if len(data) < start + 4:
            return None
        start += 4 + 4 * int.from_bytes(data[start + 2 : start + 4])
    end = len(data) - data[-1] if first & 0x20 else len(data)  # padding
    if start > end:
        return None
    return start, end


def packet_struct(payload_size: int) -> struct.Struct:
    """The shared struct that packs a whole RTP packet with this payload size."""
    packer = _PACKETS.get(payload_size)
    if packer is None:
        packer = _PACKETS[payload_size] = struct.Struct(f"!BBHII{payload_size}s")
    return packer


def ip_text(host: str) -> str:
    """``host`` written as the kernel reports a datagram's source: IPv6
    compressed, IPv4 without a ``::ffff:`` prefix; a host name unchanged."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def source_ip(addr: Address) -> str:
    """The IP of a datagram's source; an IPv4 peer of a dual-stack socket without its ``::ffff:``."""
    host = addr[0]
    return host[7:] if host.startswith("::ffff:") else host
