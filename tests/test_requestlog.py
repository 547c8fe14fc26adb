from __future__ import annotations

import asyncio
import io
import json
import re

import pytest

from relay.accounting.requestlog import RequestLogger, strip_query

FIELDS = {
    "time",
    "method",
    "path",
    "status",
    "model",
    "prompt_tokens",
    "completion_tokens",
    "cost_usd",
    "cache",
    "latency_ms",
    "upstream",
    "key",
}


def entry(**overrides):
    args = dict(
        method=b"POST",
        path=b"/v1/chat/completions?api-key=sk-secret123&x=1",
        status=200,
        model="gpt-4o",
        prompt_tokens=1200,
        completion_tokens=30,
        cost_usd=0.00202,
        cache="MISS",
        latency_ms=123.4567,
        upstream="api.openai.com",
        key="3f2a9c0d1e4b5a6c",
        now=1700000000.25,
    )
    args.update(overrides)
    return args


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_one_json_line_without_a_loop() -> None:
    out = io.StringIO()
    logger = RequestLogger(out)
    logger.log(**entry())
    [record] = lines(out)  # written at once: no loop to flush later
    assert set(record) == FIELDS
    assert record == {
        "time": "2023-11-14T22:13:20.250Z",
        "method": "POST",
        "path": "/v1/chat/completions",
        "status": 200,
        "model": "gpt-4o",
        "prompt_tokens": 1200,
        "completion_tokens": 30,
        "cost_usd": 0.00202,
        "cache": "MISS",
        "latency_ms": 123.457,
        "upstream": "api.openai.com",
        "key": "3f2a9c0d1e4b5a6c",
    }
    assert "sk-secret123" not in out.getvalue()


def test_time_format_is_iso_utc() -> None:
    out = io.StringIO()
    logger = RequestLogger(out)
    logger.log(**entry(now=None))
    logger.log(**entry(now=1700000001.999))
    first, second = lines(out)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["time"])
    assert second["time"] == "2023-11-14T22:13:21.999Z"


def test_strip_query() -> None:
    assert strip_query(b"/v1/models?key=abc") == "/v1/models"
    assert strip_query("/a#frag") == "/a"
    assert strip_query("/plain") == "/plain"
    assert len(strip_query("/" + "x" * 10000)) == 2048


def test_client_strings_are_escaped_and_bounded() -> None:
    out = io.StringIO()
    logger = RequestLogger(out)
    logger.log(**entry(model='evil"\n{"status":1}' + "m" * 1000, key=None, upstream=None))
    text = out.getvalue()
    assert text.count("\n") == 1  # no line injection
    [record] = lines(out)
    assert record["model"].startswith('evil"\n') and len(record["model"]) == 256
    assert record["key"] is None and record["upstream"] is None


def test_buffered_and_flushed_by_the_loop() -> None:
    out = io.StringIO()

    async def main() -> tuple[int, int]:
        logger = RequestLogger(out, flush_interval=0.01)
        for i in range(3):
            logger.log(**entry(status=200 + i))
        buffered = len(out.getvalue())
        for _ in range(200):  # bounded wait for the timer
            await asyncio.sleep(0.005)
            if out.getvalue():
                break
        return buffered, len(lines(out))

    buffered, written = asyncio.run(main())
    assert buffered == 0
    assert written == 3
    assert [r["status"] for r in lines(out)] == [200, 201, 202]


def test_flushes_when_buffer_is_full() -> None:
    out = io.StringIO()

    async def main() -> int:
        logger = RequestLogger(out, flush_interval=60, max_buffered=5)
        for _ in range(5):
            logger.log(**entry())
        count = len(lines(out))
        logger.log(**entry())
        logger.close()
        return count

    assert asyncio.run(main()) == 5
    assert len(lines(out)) == 6


def test_broken_stream_never_raises() -> None:
    out = io.StringIO()
    out.close()
    logger = RequestLogger(out)
    logger.log(**entry())
    logger.log(**entry())
    assert logger.dropped == 2


def test_defaults_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    RequestLogger().log(**entry())
    assert json.loads(capsys.readouterr().err)["status"] == 200


def _dumped(**fields: object) -> str:
    """The line the logger must write: json.dumps of the record, as documented."""
    args = entry(**fields)
    path = args["path"]
    return json.dumps(
        {
            "time": "2023-11-14T22:13:20.250Z",
            "method": args["method"].decode("latin-1")[:16] if isinstance(args["method"], bytes)
            else args["method"][:16],
            "path": strip_query(path),
            "status": args["status"],
            "model": None if args["model"] is None else args["model"][:256],
            "prompt_tokens": args["prompt_tokens"],
            "completion_tokens": args["completion_tokens"],
            "cost_usd": args["cost_usd"],
            "cache": args["cache"],
            "latency_ms": round(args["latency_ms"], 3),
            "upstream": None if args["upstream"] is None else args["upstream"][:256],
            "key": None if args["key"] is None else args["key"][:64],
        },
        separators=(",", ":"),
    ) + "\n"


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"model": "gpt-4o-\u00e9\u4e2d\U0001f600", "key": "n\u00e4me"},
        {"model": 'a"b\\c\x00\x1f\u2028', "upstream": "up\tstream", "cache": "HIT"},
        {"cost_usd": 1e-07, "latency_ms": 0.0, "prompt_tokens": 0, "completion_tokens": 10**20},
        {"cost_usd": 0, "latency_ms": 1e16, "status": 499, "model": None, "key": None},
        {"cost_usd": 123456789.123456789, "latency_ms": 2.0005},
        {"method": "GET", "path": "/v1/models#frag?x", "upstream": None},
        {"path": b"/v1/\xff\xfe?k=v", "key": "k" * 100, "model": "m" * 300},
    ],
)
def test_lines_are_what_json_dumps_writes(fields: dict[str, object]) -> None:
    # Twice each: the second line comes from the remembered pieces.
    out = io.StringIO()
    logger = RequestLogger(out)
    logger.log(**entry(**fields))
    logger.log(**entry(**fields))
    assert out.getvalue() == _dumped(**fields) * 2


def test_remembered_pieces_stay_bounded() -> None:
    out = io.StringIO()
    logger = RequestLogger(out)
    for i in range(10_000):
        logger.log(**entry(path=f"/v1/p{i}", model=f"m{i}"))
    assert lines(out)[-1]["path"] == "/v1/p9999" and lines(out)[-1]["model"] == "m9999"
    assert all(len(memo) <= 4096 for memo in (logger._paths, logger._strings))
