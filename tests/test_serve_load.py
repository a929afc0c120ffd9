"""benchmarks/serve_load.py's own parts that need no server: how its clients split a raw stream into
server-sent events (--client events)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from serve_load import sse_events  # noqa: E402


def test_sse_events_joins_pieces_split_anywhere():
    events = [json.dumps({"choices": [{"text": f"t{i}"}]}).encode() for i in range(5)] + [b"[DONE]"]
    stream = b"".join(b"data: " + e + b"\n\n" for e in events)
    for size in (1, 2, 3, 7, 64, len(stream)):
        pieces = [stream[i:i + size] for i in range(0, len(stream), size)]
        assert list(sse_events(pieces)) == events, size


def test_sse_events_reads_crlf_comments_and_multiline_data():
    stream = b": keep-alive\r\n\r\ndata: {\"a\": 1}\r\n\r\nevent: x\ndata: line1\ndata: line2\n\ndata:[DONE]\n\n"
    pieces = [stream[i:i + 5] for i in range(0, len(stream), 5)]
    assert list(sse_events(pieces)) == [b'{"a": 1}', b"line1\nline2", b"[DONE]"]


def test_sse_events_keeps_an_unfinished_event_back():
    assert list(sse_events([b"data: 1\n\ndata: 2"])) == [b"1"]
