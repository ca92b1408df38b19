"""Secret values masked in what goes back to the guest, byte for byte (pure code, no I/O)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from matchlock.net.masking import MaskedSequence, PlaceholderScanner, ValueMask
from matchlock.net.websocket import ServerFrameMask, WebSocketError

VALUE = b"supersecretvalue"


def _naive(values: list[bytes], chunks: list[bytes]) -> bytes:
    out = b"".join(chunks)
    for v in sorted(set(values), key=len, reverse=True):
        out = out.replace(v, b"*" * len(v))
    return out


@settings(max_examples=500, deadline=None)
@given(st.lists(st.binary(min_size=2, max_size=6), min_size=1, max_size=3),
       st.lists(st.binary(max_size=12), max_size=6))
def test_stream_mask_equals_masking_the_whole_and_keeps_length(
    values: list[bytes], chunks: list[bytes]
) -> None:
    m = ValueMask(values)
    got = b"".join(m.feed(c) for c in chunks) + m.flush()
    whole = b"".join(chunks)
    assert len(got) == len(whole)
    for v in values:  # no value survives, however it was split
        assert v not in got or v.strip(b"*") == b""
    if len({len(v) for v in values}) == 1 and len(values) == 1:
        assert got == _naive(values, chunks)


def test_sequence_masks_across_framing_and_keeps_layout() -> None:
    seq = MaskedSequence(ValueMask([VALUE]))
    seq.payload(b"xx" + VALUE[:5])
    seq.framing(b"<F1>")
    first = seq.take()
    assert first == b"xx"  # the possible start of a value waits, and the framing behind it
    seq.payload(VALUE[5:] + b"yy")
    seq.framing(b"<F2>")
    seq.finish()
    assert first + seq.take() == b"xx*****<F1>" + b"*" * (len(VALUE) - 5) + b"yy<F2>"


def test_placeholder_scanner_finds_split_placeholders() -> None:
    s = PlaceholderScanner({b"SANDBOX_SECRET_abc": "KEY"})
    assert s.feed(b"hello SANDBOX_SEC") is None
    assert s.feed(b"RET_abc tail") == "KEY"


def _frame(op: int, payload: bytes, fin: bool = True, masked: bool = False) -> bytes:
    b1 = len(payload) if len(payload) < 126 else 126
    ext = b"" if b1 < 126 else len(payload).to_bytes(2, "big")
    return bytes([(0x80 if fin else 0) | op, b1 | (0x80 if masked else 0)]) + ext + payload


def test_websocket_frames_masked_across_fragments_whatever_the_reads() -> None:
    stream = (_frame(1, b"hi " + VALUE[:6], fin=False) + _frame(9, VALUE)
              + _frame(0, VALUE[6:] + b" " * 200) + _frame(8, b""))
    expected = (_frame(1, b"hi ******", fin=False) + _frame(9, b"*" * len(VALUE))
                + _frame(0, b"*" * (len(VALUE) - 6) + b" " * 200) + _frame(8, b""))
    for step in (1, 2, 3, 7, 50, len(stream)):
        m = ServerFrameMask(ValueMask([VALUE]), ValueMask([VALUE]))
        out = b"".join(m.feed(stream[i:i + step]) for i in range(0, len(stream), step))
        assert out + m.finish() == expected


def test_websocket_masked_server_frame_is_refused() -> None:
    m = ServerFrameMask(ValueMask([VALUE]), ValueMask([VALUE]))
    try:
        m.feed(_frame(1, b"abcd", masked=True))
    except WebSocketError as exc:
        assert "masked" in str(exc)
    else:
        raise AssertionError("a masked server frame was accepted")
