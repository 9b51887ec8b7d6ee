"""The block responses rendered once per (reason, host, licence, kind of body) and remembered: the
bytes of every block are the ones a full rendering gives (the reference below is how each block
was rendered before), whatever the host or licence holds, and the remembered responses stay
within their bound."""

from __future__ import annotations

import html
import json
import time

from hypothesis import given
from hypothesis import strategies as st

from conftest import REPO
from icpgate.config.display_time import BEIJING
from icpgate.gate import blockpage
from icpgate.gate.blockpage import BLOCK_REASONS, RESPONSE_CACHE_BYTES, BlockPages, Operator, new_request_id
from icpgate.policy.decide import Action, Reason, Verdict
from icpgate.policy.pack import load_pack
from icpgate.registry.index import IndexedFiling

PACK = REPO / "policies" / "default.toml"
PAGES = BlockPages(load_pack(PACK).block, Operator("某某数据中心 <IDC> & Co", "noc@example.com"))


def reference(pages: BlockPages, verdict: Verdict, request_id: str, *, json_body: bool, head_only: bool) -> bytes:
    """The whole response rendered from scratch for one block."""
    status = 400 if verdict.reason is Reason.INVALID else pages.settings.http_status
    if json_body:
        text = pages.messages[verdict.reason.value]
        facts = {
            "blocked": True,
            "status": status,
            "domain": verdict.host or None,
            "reason": verdict.reason.value,
            "title": {"zh": text["title_zh"], "en": text["title_en"]},
            "why": {"zh": text["why_zh"], "en": text["why_en"]},
            "action_required": {"zh": text["todo_zh"], "en": text["todo_en"]},
            "licence": verdict.filing.licence if verdict.filing else None,
            "operator": {"name": pages.operator.name, "contact": pages.operator.contact},
            "request_id": request_id,
            "time": blockpage._Clock.now(),
        }
        body, content_type = json.dumps(facts, ensure_ascii=False).encode(), "application/json; charset=utf-8"
    else:
        fields = {
            "domain": html.escape(verdict.host) if verdict.host else "—",
            "licence": html.escape(verdict.filing.licence) if verdict.filing else "—",
            "request_id": request_id,
            "time": blockpage._Clock.local_now(pages.operator.zone),
        }
        parts = pages.pages[verdict.reason]
        body = b"".join(fields[part].encode() if index % 2 else part for index, part in enumerate(parts))
        content_type = "text/html; charset=utf-8"
    head = (
        "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nCache-Control: no-store\r\n"
        "Connection: close\r\nX-ICP-Gate: blocked; reason=%s; id=%s\r\n\r\n"
        % (status, blockpage.STATUS_TEXT[status], content_type, len(body), verdict.reason.value, request_id)
    ).encode()
    return head if head_only else head + body


def both(pages: BlockPages, verdict: Verdict, request_id: str, *, json_body: bool,
         head_only: bool) -> tuple[bytes, bytes]:  # fmt: skip
    """The remembered rendering and the reference, made within one second (the page shows the time)."""
    for _ in range(5):
        second = int(time.time())
        got = pages.http_response(verdict, request_id, json_body=json_body, head_only=head_only)
        expected = reference(pages, verdict, request_id, json_body=json_body, head_only=head_only)
        if int(time.time()) == second:
            return got, expected
    raise AssertionError("the clock kept turning the second")


def verdict_for(reason: Reason, host: str, licence: str | None) -> Verdict:
    filing = IndexedFiling(licence, None, False, ()) if licence is not None else None  # type: ignore[arg-type]
    return Verdict(Action.BLOCK, reason, "test", host, filing=filing)


HOSTS = (
    "example-unfiled.cn",
    "",
    "<script>alert('x')</script>&amp;\"",
    "例子.中国",
    "a$time$request_id${domain}",
    "x" * 8000,
)


def test_every_reason_host_and_body_kind_gives_the_bytes_of_a_full_rendering() -> None:
    for reason in BLOCK_REASONS:
        for host in HOSTS:
            for licence in (None, "京ICP备12345678号-1", "<b>&</b>"):
                verdict = verdict_for(reason, host, licence)
                for json_body in (False, True):
                    for head_only in (False, True):
                        for _ in range(2):  # rendered, then remembered: a new id each time
                            got, expected = both(PAGES, verdict, new_request_id(), json_body=json_body,
                                                 head_only=head_only)  # fmt: skip
                            assert got == expected, (reason, host[:40], licence, json_body, head_only)


@given(
    reason=st.sampled_from(BLOCK_REASONS),
    host=st.text(max_size=60),
    licence=st.none() | st.text(max_size=30),
    request_id=st.text(max_size=20),
    json_body=st.booleans(),
)
def test_any_host_licence_and_request_id_give_the_bytes_of_a_full_rendering(
    reason: Reason, host: str, licence: str | None, request_id: str, json_body: bool
) -> None:
    verdict = verdict_for(reason, host, licence)
    for _ in range(2):
        got, expected = both(PAGES, verdict, request_id, json_body=json_body, head_only=False)
        assert got == expected


def test_the_remembered_responses_stay_within_their_bound_and_stay_right() -> None:
    pages = BlockPages(load_pack(PACK).block, Operator("IDC", "noc", BEIJING))
    for index in range(2000):  # each a few KiB: past the bound at least once
        verdict = verdict_for(Reason.UNFILED, "junk-%d.example" % index, None)
        pages.http_response(verdict, new_request_id(), json_body=bool(index % 2), head_only=False)
        assert pages._responses_size <= RESPONSE_CACHE_BYTES
    assert len(pages._responses) < 2000
    verdict = verdict_for(Reason.UNFILED, "junk-1999.example", None)
    got, expected = both(pages, verdict, new_request_id(), json_body=True, head_only=False)
    assert got == expected
