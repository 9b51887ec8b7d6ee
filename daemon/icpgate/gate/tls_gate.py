"""TLS listeners: read the ClientHello, decide on its SNI, then replay it byte-exact or block.

TLS is never terminated on the pass path: the buffered bytes (hello, and anything after it such
as early data) are replayed as they came, and the rest is relayed untouched.
"""

from __future__ import annotations

from ..policy import Action, Reason, Verdict
from .blockpage import new_request_id
from .client_hello import HelloState, parse_client_hello
from .connection import GateConnection
from .http_inspector import Head
from .tls_page import TlsPageSession

# A fatal TLS alert record: level 2 (fatal), description 112 (unrecognized_name), TLS 1.2 framing.
ALERT_UNRECOGNIZED_NAME = b"\x15\x03\x03\x00\x02\x02\x70"
ALERT_DECODE_ERROR = b"\x15\x03\x03\x00\x02\x02\x32"


class TlsConnection(GateConnection):
    kind = "tls"
    __slots__ = ("_hello", "_page", "_request_id", "_verdict")

    def __init__(self, listener) -> None:
        super().__init__(listener)
        self._hello: bytearray | None = bytearray()
        self._page: TlsPageSession | None = None
        self._verdict: Verdict | None = None
        self._request_id = ""  # of the block, shown on the TLS block page and logged

    def inspect(self, data: bytes) -> None:
        if self._hello is None:
            self.send_upstream(data)
            return
        if self._page is not None:
            self._feed_page(data)
            return
        self._hello += data
        hello = parse_client_hello(self._hello, self.runtime.gate.max_hello_size)
        if hello.state is HelloState.NEED_MORE:
            return
        if hello.state is HelloState.ERROR:
            verdict = Verdict(Action.BLOCK, Reason.INVALID, "tls.client_hello", "", detail=hello.error)
            self.count_decision(verdict)
        else:
            verdict = self.decide(hello.sni)
        if verdict.action is Action.BLOCK:
            self._block(verdict)
            return
        self.inspection_done()
        replay, self._hello = bytes(self._hello), None
        self.send_upstream(replay)

    def _block(self, verdict: Verdict) -> None:
        self.runtime.stats["blocks", "tls", verdict.reason] += 1
        self._request_id = new_request_id()
        self.record_violation(verdict, self._request_id)
        action = self.runtime.pages.settings.tls_action
        if action == "page" and verdict.reason is not Reason.INVALID and self.runtime.tls_pages is not None:
            self._start_page(verdict)
        elif action == "alert":
            alert = ALERT_DECODE_ERROR if verdict.reason is Reason.INVALID else ALERT_UNRECOGNIZED_NAME
            self.reply_and_close(alert)
        else:
            self.reset()

    def _start_page(self, verdict: Verdict) -> None:
        self._verdict = verdict
        context = self.runtime.tls_pages.context_for(verdict.host or None)
        self._page = TlsPageSession(context, self.transport.write, self.runtime.gate.max_header_size)
        hello, self._hello = bytes(self._hello), bytearray()
        self.restart_inspect_deadline()  # the page's handshake and request get their own deadline
        self._feed_page(hello)

    def _feed_page(self, data: bytes) -> None:
        self._page.feed(data, self._page_answer)
        if self._page.finished:
            self.close()

    def _page_answer(self, head: Head | None) -> bytes:
        request = head.request if head else None
        return self.runtime.pages.http_response(
            self._verdict,
            self._request_id,
            json_body=request is not None and request.accepts_json(),
            head_only=request is not None and request.method == "HEAD",
        )

    def inspection_timed_out(self) -> None:
        if self._page is not None:  # the block page's own handshake stalled
            self.abort()
            return
        verdict = Verdict(Action.BLOCK, Reason.INVALID, "tls.hello_timeout", "", detail="no complete ClientHello")
        self.count_decision(verdict)
        self._block(verdict)

    def refuse_full(self) -> None:
        self.reset()

    def upstream_failed(self) -> None:
        self.runtime.stats["upstream_failures", "tls"] += 1
        self.close()
