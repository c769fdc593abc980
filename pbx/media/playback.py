"""The server talking to a relay side itself, and the one RTP stream its peer receives.

The server can talk to a side (IVR prompts, music on hold, queues) without a
re-INVITE, since the peer's SDP already points at the side's port. While it
has something of its own to send, a side sends one pre-encoded 20 ms payload
per tick of the process's shared ``MediaClock`` (one clock callback per side,
no task per call), and holds back whatever the other side relays towards its
peer. In each tick the side itself picks the one frame that goes out, so no
tick ever gets two: a prompt's (``side.play(frames)``), else the frame of the
loop it is tuned to (``side.tune_in(frames, origin)``: music on hold, one
loop many sides share at one position), else the frame a live source makes
for that tick (``side.feed(source)``: a mix, pbx.media.mixer), else, while
the server answers the peer (``side.start_filling()``, from answering until
``side.hand_over()`` when someone else is bridged in), a frame of silence in
the peer's codec.
Carriers hang up calls that send no RTP for 30-60 s and NAT bindings close,
so a caller waiting for a key, an agent or a callee hears silence rather
than nothing.

What the peer receives stays one continuous RTP stream across the switches
between our frames and relayed packets: once a side has sent anything of its
own, it sends everything under its own SSRC with consecutive sequence
numbers, relayed packets get their sequence number and timestamp moved by an
offset fixed at each switch, and timestamps follow the clock. The marker bit
flags the first packet of each prompt, of the stream, and after a gap (a
hold, ticks the clock skipped); RFC 3389 comfort noise is not offered in our
SDP, so silence is plain codec silence. A side that never sends anything of
its own keeps the untouched pass-through path of :mod:`pbx.media.relay_side`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import struct
from collections.abc import Callable, Sequence

from pbx.media.clock import ClockSubscription, MediaClock
from pbx.media.codecs import Codec
from pbx.media.prompts import SILENCE
from pbx.media.rtp_packet import RTP_HEADER, Address, PayloadRule, pack_seq_ts_ssrc, packet_struct, rewrite, unpack_seq_ts_ssrc

logger = logging.getLogger(__name__)

# An RFC 4733 telephone-event packet: RTP header, then event, E bit and volume, duration.
_KEY_PACKET = struct.Struct("!BBHIIBBH")


class NoMediaClock(RuntimeError):
    """``play()``, ``tune_in()`` or ``start_filling()`` on a relay created without a ``MediaClock``."""


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
    continued in the same stream once it has sent frames of its own.

    The base of :class:`pbx.media.relay_side.RelaySide`, which keeps the
    peer's ``codec``, ``dest`` and ``transport`` and hands each packet from
    the other side to ``_relay_into_stream`` while ``_rewriting``.
    """

    name: str
    transport: asyncio.DatagramTransport  # the side's RTP socket, set by connection_made
    codec: Codec | None  # the peer's, from its SDP
    dest: Address | None  # where RTP for the peer goes, None: nowhere

    def __init__(self, media_clock: MediaClock | None) -> None:
        self.played = 0  # frames of our own (prompts, music, silence) sent to the peer
        # Packets and payload octets of our own stream (our frames and relayed
        # packets within it): an RTCP sender report's counts (pbx.media.rtcp).
        self.stream_packets = 0
        self.stream_octets = 0
        # Each frame of our own the peer is sent (its payload), e.g. for a recording.
        self.on_played: Callable[[bytes], None] | None = None
        self.closed = False  # set by close()
        self.handovers = 0  # calls of hand_over(): music still loading when one came is not for this peer
        self._media_clock = media_clock
        # What this side sends of its own, by precedence; the clock calls
        # _tick while any of them is set (and only then).
        self._playback: Playback | None = None
        self._music: Sequence[bytes] | None = None  # tune_in()'s loop
        self._music_origin = 0  # the tick at which that loop is at its first frame
        self._feed: Callable[[int], bytes] | None = None  # feed()'s source
        self._silence: bytes | None = None  # set while filling
        self._subscription: ClockSubscription | None = None
        # Our own outgoing stream, used once this side has sent anything of its own.
        self._rewriting = False  # relayed packets go out in our stream
        self._ssrc = random.getrandbits(32)
        self._seq = random.getrandbits(16)  # of the last packet the peer got
        self._timestamp = random.getrandbits(32)  # of the last packet the peer got
        self._position: int | None = None  # clock tick that last packet stands for
        self._marker = 0  # 0x80: the next frame sent starts a prompt
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

    @property
    def holds_back(self) -> bool:
        """Whether what the other side relays is kept from the peer now,
        which gets frames of our own instead (a prompt, music, silence)."""
        return self._subscription is not None

    def play(self, payloads: Sequence[bytes], *, loop: bool = False) -> Playback:
        """Send ``payloads`` to this side's peer, one per media clock tick.

        Each payload is one pre-encoded 20 ms frame in the side's negotiated
        codec; it goes out under that codec's payload type, the first with the
        marker bit. Replaces what was playing. Until the playback ends, packets
        relayed from the other side to this peer are held back; then the side
        goes back to its music, its silence, or relaying, in the same stream.
        While the side has no destination (no address yet, on hold) frames are
        used up without being sent. ``loop=True`` starts over after the last
        frame until stopped. Raises NoMediaClock when the relay has no clock.
        """
        self._clock()
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
        self._marker = 0x80
        if current is not None:
            self._end_playback(current, False)
        self._own_stream_changed()
        return playback

    def stop_playback(self) -> None:
        """Stop what is playing to this side, if anything."""
        if self._playback is not None:
            self._end_playback(self._playback, False)

    def _end_playback(self, playback: Playback, played_out: bool) -> None:
        playback._side = None
        if not playback.done.done():  # the caller may have cancelled it
            playback.done.set_result(played_out)
        if self._playback is playback:
            self._playback = None
            self._own_stream_changed()

    def tune_in(self, frames: Sequence[bytes], origin: int) -> None:
        """Send a shared loop of 20 ms frames whenever nothing plays: in tick
        ``t`` its frame ``(t - origin) % len(frames)``, so every side tuned to
        one loop with one ``origin`` hears the same frame at once (music on
        hold). Replaces the loop it was tuned to; like ``play()`` it holds back
        what the other side relays. Raises NoMediaClock when the relay has no clock."""
        self._clock()
        self._music = frames if frames else None
        self._music_origin = origin
        self._own_stream_changed()

    def feed(self, source: Callable[[int], bytes] | None) -> None:
        """Send ``source(tick)``, a 20 ms payload in the side's codec made for
        that tick, in every tick in which no prompt or loop plays (a mix the
        server makes, pbx.media.mixer); None stops it. Like ``play()`` it
        holds back what the other side relays, and ``hand_over()`` leaves it
        on: its owner stops it. Raises NoMediaClock when the relay has no clock."""
        self._clock()
        self._feed = source
        self._own_stream_changed()

    def tune_out(self) -> None:
        """Stop sending the loop of ``tune_in()``; a no-op when not tuned in."""
        if self._music is not None:
            self._music = None
            self._own_stream_changed()

    def start_filling(self) -> None:
        """Send a frame of silence in every tick in which nothing else of ours
        plays: for as long as the server answers this side's peer itself,
        which then gets one packet every 20 ms whatever happens. Holds back
        what the other side relays until ``hand_over()``. The peer's codec
        must be known (``set_remote``); for a codec we have no silence of, or
        on a closed side, nothing happens. Raises NoMediaClock when the relay
        has no clock."""
        self._clock()
        codec = self.codec
        self._silence = SILENCE.get(codec.name.upper()) if codec is not None else None
        if self._silence is None:
            logger.warning("relay side %s: no silence for codec %s; its peer gets no RTP between prompts", self.name, codec)
        self._own_stream_changed()

    def hand_over(self) -> None:
        """Stop sending anything of ours, the silence of ``start_filling()``
        included: someone else talks to the peer now, and the packets relayed
        from the other side continue the stream. What was playing is done, False."""
        self._music = self._silence = None
        self.handovers += 1
        self.stop_playback()
        self._own_stream_changed()

    def close(self) -> None:
        """Send nothing of ours any more (the relay closes)."""
        self.closed = True
        self.hand_over()

    def _clock(self) -> MediaClock:
        clock = self._media_clock
        if clock is None:
            raise NoMediaClock(f"relay side {self.name} cannot send of its own: create the relay with RtpRelay.create(pool, clock)")
        return clock

    def _own_stream_changed(self) -> None:
        """Be on the clock exactly while there is something of ours to send;
        starting or stopping, the stream changes hands with relayed packets."""
        sending = not self.closed and (
            self._playback is not None or self._music is not None or self._feed is not None or self._silence is not None
        )
        subscription = self._subscription
        if sending == (subscription is not None):
            return
        self._in_ssrc = None  # the next relayed packet fixes new offsets
        if subscription is None:
            self._own_stream()
            self._subscription = self._clock().subscribe(self._tick)
        else:
            self._clock().unsubscribe(subscription)
            self._subscription = None

    @property
    def own_stream(self) -> bool:
        """Whether relayed packets go out in our stream (renumbered): the side has sent of its own."""
        return self._rewriting

    def _own_stream(self) -> None:
        """Relayed packets go out in our stream from now on (for good: the peer has seen it)."""
        self._rewriting = True

    def send_frame(self, payload: bytes, tick: int) -> None:
        """Send one pre-encoded 20 ms frame of our own stream, stamped for clock tick ``tick``.

        The one way our frames leave (``_tick`` calls it once per tick): under
        the side's codec payload type, SSRC and next sequence number, with the
        marker when a prompt starts, and with a marker and the clock's time
        when the last packet the peer got was not for ``tick - 1``. Counted in
        ``played``. Without a destination (no address yet, on hold) or codec
        nothing is sent.
        """
        dest = self.dest
        codec = self.codec
        if dest is None or codec is None:
            return
        if self._position == tick - 1:
            second = codec.payload_type | self._marker
            timestamp = (self._timestamp + self._samples) & 0xFFFFFFFF
        else:  # the stream starts or resumes after a gap: marker
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
        self._marker = 0
        self.played += 1
        self.stream_packets += 1
        self.stream_octets += len(payload)
        on_played = self.on_played
        if on_played is not None:
            on_played(payload)

    def send_key(self, event: int, payload_type: int) -> None:
        """Send the peer one key press of our own, RFC 4733 ``event`` under
        ``payload_type``: a press the other side's peer made that was kept
        back while it could have been a feature code, given back late. The
        packets (a start, then the end three times, 100 ms long) go out at
        once in our stream, which relayed packets continue from then on.
        Without a destination (no address yet, on hold) nothing is sent."""
        dest = self.dest
        if dest is None or self.closed:
            return
        clock = self._clock()
        self._own_stream()
        self._in_ssrc = None  # the next relayed packet fixes new offsets, after these numbers
        timestamp = self._next_timestamp(clock.tick)
        length = 5 * self._samples
        for marker, end, duration in ((0x80, 0, self._samples), (0, 0x80, length), (0, 0x80, length), (0, 0x80, length)):
            self._seq = (self._seq + 1) & 0xFFFF
            header = _KEY_PACKET.pack(0x80, payload_type | marker, self._seq, timestamp, self._ssrc, event, end | 10, duration)
            self.transport.sendto(header, dest)
            self.stream_packets += 1
            self.stream_octets += 4
        self._timestamp = timestamp
        self._position = clock.tick

    def _tick(self, tick: int) -> None:
        """Send this tick's one frame: the prompt's, else the loop's, else
        the feed's, else silence. The per-packet path of every call the server answers."""
        playback = self._playback
        try:
            if playback is not None:
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
            elif self._music is not None:
                music = self._music
                self.send_frame(music[(tick - self._music_origin) % len(music)], tick)
            elif self._feed is not None:
                self.send_frame(self._feed(tick), tick)
            elif self._silence is not None:
                self.send_frame(self._silence, tick)
        except Exception:
            # Given up rather than retried: one traceback, not fifty a second.
            logger.exception("relay side %s: cannot send its own frames; it sends none any more", self.name)
            self._feed = None
            self.hand_over()

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

        Used once this side has sent of its own: the SSRC becomes ours, and
        sequence number and timestamp continue ours by offsets fixed at the
        first packet after a switch (the end of our own frames, or a new SSRC
        from the other peer). False when not sent: we send our own frames
        (held back), or the packet is malformed.
        """
        if self._subscription is not None:
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
        self.stream_packets += 1
        self.stream_octets += len(packet) - RTP_HEADER
        if (seq - self._seq) & 0xFFFF < 0x8000:  # not a late, reordered one
            self._seq = seq
            self._timestamp = timestamp
            self._position = position
        return True
