"""The server talking to a relay side itself, and the one RTP stream its peer receives.

The server can talk to a side (IVR prompts, music on hold, later queues)
without a re-INVITE, since the peer's SDP already points at the side's
port: ``side.play(frames)`` sends one pre-encoded 20 ms payload per tick of
the process's shared ``MediaClock`` (no task per call), while whatever the
other side relays towards that peer is held back. A sender that serves many
sides from one stream of its own (music on hold) hands each side its frame
with ``side.send_frame(payload, tick)`` instead.

What the peer receives stays one continuous RTP stream across the switches
between our frames and relayed packets: once a side has played, it sends
everything under its own SSRC, and relayed packets get their sequence number
and timestamp moved by an offset fixed at each switch. A side that never
plays keeps the untouched pass-through path of :mod:`pbx.media.relay_side`.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence

from pbx.media.clock import ClockSubscription, MediaClock
from pbx.media.codecs import Codec
from pbx.media.rtp_packet import RTP_HEADER, Address, PayloadRule, pack_seq_ts_ssrc, packet_struct, rewrite, unpack_seq_ts_ssrc


class NoMediaClock(RuntimeError):
    """``play()`` on a relay that was created without a ``MediaClock``."""


class Playback:
    """Frames being played to one relay side; returned by ``side.play()``.

    ``done`` resolves True when the last frame has been sent (never, for a
    looping playback) and False when it was stopped or replaced first.
    """

    __slots__ = ("frames", "loop", "done", "_index", "_side")

    def __init__(self, side: PeerStream, frames: Sequence[bytes], loop: bool, done: asyncio.Future[bool]) -> None:
        self.frames = frames
        self.loop = loop
        self.done = done
        self._index = 0  # the frame the next tick sends
        self._side: PeerStream | None = side  # None once finished

    @property
    def playing(self) -> bool:
        """True until the playback has ended, whichever way."""
        return self._side is not None

    def stop(self) -> None:
        """Stop sending (``done`` becomes False); a no-op once ended."""
        if self._side is not None:
            self._side._end_playback(self, False)


class PeerStream:
    """What a relay side sends its peer: our own frames, and relayed packets
    continued in the same stream once it has played.

    The base of :class:`pbx.media.relay_side.RelaySide`, which keeps the
    peer's ``codec``, ``dest`` and ``transport`` and hands each packet from
    the other side to ``_relay_into_stream`` while ``_rewriting``.
    """

    name: str
    transport: asyncio.DatagramTransport  # the side's RTP socket, set by connection_made
    codec: Codec | None  # the peer's, from its SDP
    dest: Address | None  # where RTP for the peer goes, None: nowhere

    def __init__(self, media_clock: MediaClock | None) -> None:
        self.played = 0  # frames of our own sent to the peer
        self.closed = False  # set by RtpRelay.close()
        self._media_clock = media_clock
        # Our own outgoing stream, used once this side has played something.
        self._playback: Playback | None = None
        self._subscription: ClockSubscription | None = None
        self._rewriting = False  # relayed packets go out in our stream
        self._ssrc = random.getrandbits(32)
        self._seq = random.getrandbits(16)  # of the last packet the peer got
        self._timestamp = random.getrandbits(32)  # of the last packet the peer got
        self._position: int | None = None  # clock tick that last packet stands for
        self._in_ssrc: int | None = None  # relayed stream the offsets are for
        self._seq_offset = 0
        self._timestamp_offset = 0
        self._packet = bytearray(RTP_HEADER + 160)  # reused for every frame we send
        self._packer = packet_struct(160)
        self._samples = 160  # RTP clock units per frame: 20 ms at 8000 Hz; the side's codec sets it

    @property
    def playback(self) -> Playback | None:
        """What is being played to this side now, if anything."""
        return self._playback

    def play(self, payloads: Sequence[bytes], *, loop: bool = False) -> Playback:
        """Send ``payloads`` to this side's peer, one per media clock tick.

        Each payload is one pre-encoded 20 ms frame in the side's negotiated
        codec; it goes out under that codec's payload type. Replaces what was
        playing. Until the playback ends, packets relayed from the other side
        to this peer are dropped; then relaying resumes, still in our stream.
        While the side has no destination (no address yet, on hold) frames are
        used up without being sent. ``loop=True`` starts over after the last
        frame until stopped. Raises NoMediaClock when the relay has no clock.
        """
        clock = self._media_clock
        if clock is None:
            raise NoMediaClock(f"relay side {self.name} cannot play: create the relay with RtpRelay.create(pool, clock)")
        if self.closed:
            raise RuntimeError(f"relay side {self.name} is closed")
        frames = payloads if isinstance(payloads, tuple) else tuple(payloads)
        playback = Playback(self, frames, loop, asyncio.get_running_loop().create_future())
        if not frames:
            self.stop_playback()
            self._end_playback(playback, True)
            return playback
        current = self._playback
        self._playback = playback
        self._rewriting = True
        self._in_ssrc = None
        if current is not None:
            self._end_playback(current, False)
        if self._subscription is None:
            self._subscription = clock.subscribe(self._tick)
        return playback

    def stop_playback(self) -> None:
        """Stop what is playing to this side, if anything; relaying resumes."""
        if self._playback is not None:
            self._end_playback(self._playback, False)

    def _end_playback(self, playback: Playback, played_out: bool) -> None:
        playback._side = None
        if not playback.done.done():  # the caller may have cancelled it
            playback.done.set_result(played_out)
        if self._playback is playback:
            self._playback = None
            self._in_ssrc = None  # the next relayed packet fixes new offsets
            if self._subscription is not None and self._media_clock is not None:
                self._media_clock.unsubscribe(self._subscription)
                self._subscription = None

    def send_frame(self, payload: bytes, tick: int) -> None:
        """Send one pre-encoded 20 ms frame of our own stream, stamped for clock tick ``tick``.

        For senders that share one stream among many sides (music on hold),
        called from their clock callback; ``play()`` uses it too. The frame
        goes out under the side's codec payload type, SSRC and next sequence
        number, with a marker and the clock's time when the last packet the
        peer got was not for ``tick - 1``. Counted in ``played``. Without a
        destination (no address yet, on hold) or codec nothing is sent.
        Unlike ``play()`` it does not hold back what the other side relays;
        packets relayed afterwards continue this stream.
        """
        # Called from outside play(), this side may not have taken its stream
        # over yet; and the next relayed packet must fix new offsets after us.
        self._rewriting = True
        self._in_ssrc = None
        dest = self.dest
        codec = self.codec
        if dest is None or codec is None:
            return
        if self._position == tick - 1:
            second = codec.payload_type
            timestamp = (self._timestamp + self._samples) & 0xFFFFFFFF
        else:  # a talkspurt starts (or our stream takes over): marker
            second = codec.payload_type | 0x80
            timestamp = self._next_timestamp(tick)
        seq = (self._seq + 1) & 0xFFFF
        packer = self._packer
        if packer.size != RTP_HEADER + len(payload):
            packer = self._packer = packet_struct(len(payload))
            self._packet = bytearray(packer.size)
        packer.pack_into(self._packet, 0, 0x80, second, seq, timestamp, self._ssrc, payload)
        # The transport copies the buffer only if the socket would block.
        self.transport.sendto(self._packet, dest)
        self._seq = seq
        self._timestamp = timestamp
        self._position = tick
        self.played += 1

    def _tick(self, tick: int) -> None:
        """Send the next frame: the per-packet path of every prompt played."""
        playback = self._playback
        if playback is None:
            return
        frames = playback.frames
        index = playback._index
        self.send_frame(frames[index], tick)
        index += 1
        if index < len(frames):
            playback._index = index
        elif playback.loop:
            playback._index = 0
        else:
            self._end_playback(playback, True)

    def _next_timestamp(self, position: int) -> int:
        """Timestamp of a packet for clock tick ``position`` after a gap or switch.

        It moves on by the ticks since the last packet the peer got (at least
        one frame), so the peer's jitter buffer sees real time pass.
        """
        last = self._position
        frames = 1 if last is None else max(position - last, 1)
        return (self._timestamp + frames * self._samples) & 0xFFFFFFFF

    def _relay_into_stream(self, data: bytes, rule: PayloadRule | None, dest: Address) -> bool:
        """Forward a packet from the other side within this side's own stream.

        Used once this side has played: the SSRC becomes ours, and sequence
        number and timestamp continue ours by offsets fixed at the first packet
        after a switch (end of playback, or a new SSRC from the other peer).
        False when not sent: something is playing, or the packet is malformed.
        """
        if self._playback is not None:
            return False
        packet = bytearray(data) if rule is None else rewrite(data, rule)
        if packet is None:
            return False
        clock = self._media_clock
        position = clock.tick + 1 if clock is not None else 0
        seq, timestamp, ssrc = unpack_seq_ts_ssrc(packet, 2)
        if ssrc != self._in_ssrc:
            self._in_ssrc = ssrc
            self._seq_offset = (self._seq + 1 - seq) & 0xFFFF
            self._timestamp_offset = (self._next_timestamp(position) - timestamp) & 0xFFFFFFFF
            packet[1] |= 0x80
        seq = (seq + self._seq_offset) & 0xFFFF
        timestamp = (timestamp + self._timestamp_offset) & 0xFFFFFFFF
        pack_seq_ts_ssrc(packet, 2, seq, timestamp, self._ssrc)
        self.transport.sendto(packet, dest)
        if (seq - self._seq) & 0xFFFF < 0x8000:  # not a late, reordered one
            self._seq = seq
            self._timestamp = timestamp
            self._position = position
        return True
