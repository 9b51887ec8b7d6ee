"""TLS listeners: read the ClientHello, decide on its SNI, then replay it byte-exact or block.

TLS is never terminated on the pass path: the hello is replayed as it came, and everything after
it is relayed untouched once the server's first handshake message shows it is not a
HelloRetryRequest (`gate/tls/watch.py`): until then the client's handshake records wait, and after a
retry request the second ClientHello must name the same host as the first.
"""

from __future__ import annotations

from ...policy.decide import Action, Reason, Verdict
from ..blockpage import new_request_id
from ..connection import GateConnection
from ..http.inspector import Head
from .client_hello import HelloReassembler, HelloState
from .page import TlsPageSession
from .watch import HandshakeWatch, RetryViolation, ServerViolation

# A fatal TLS alert record: level 2 (fatal), description 112 (unrecognized_name), TLS 1.2 framing.
ALERT_UNRECOGNIZED_NAME = b"\x15\x03\x03\x00\x02\x02\x70"
ALERT_DECODE_ERROR = b"\x15\x03\x03\x00\x02\x02\x32"


class TlsConnection(GateConnection):
    kind = "tls"
    __slots__ = ("_hello", "_page", "_request_id", "_verdict", "_watch")

    def __init__(self, listener) -> None:
        super().__init__(listener)
        self._hello: HelloReassembler | None = HelloReassembler(listener.runtime.gate.max_hello_size)
        self._watch: HandshakeWatch | None = None  # from the allowed hello to the server's answer
        self._page: TlsPageSession | None = None
        self._verdict: Verdict | None = None
        self._request_id = ""  # of the block, shown on the TLS block page and logged

    def inspect(self, data: bytes) -> None:
        if self._hello is None:
            if self._watch is None:
                self.send_upstream(data)
            else:
                self._watch_client(data)
            return
        if self._page is not None:
            self._feed_page(data)
            return
        hello = self._hello.feed(data)
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
        reader, self._hello = self._hello, None
        self._watch = HandshakeWatch(hello.sni, self.runtime.gate.max_hello_size)
        self.restart_inspect_deadline()  # the server's first answer gets its own deadline
        self.send_upstream(bytes(reader.data[: reader.end]))
        if len(reader.data) > reader.end:
            self._watch_client(bytes(reader.data[reader.end :]))

    def _watch_client(self, data: bytes) -> None:
        try:
            forward = self._watch.from_client(data)
        except RetryViolation as violation:
            self._retry_violation(violation)
            return
        if forward:
            self.send_upstream(forward)

    def on_upstream_data(self, data: bytes) -> None:
        watch = self._watch
        if watch is not None:
            if self._closing:
                return
            try:
                done, forward = watch.from_server(data)
            except RetryViolation as violation:  # a second hello held since before the retry request
                self._retry_violation(violation)
                return
            except ServerViolation:
                self._server_violation()
                return
            if forward:
                self.send_upstream(forward)
            if done:
                self._watch = None
                self.inspection_done()
        self.transport.write(data)

    def _retry_violation(self, violation: RetryViolation) -> None:
        self._watch = None
        verdict = Verdict(Action.BLOCK, Reason.INVALID, "tls.hello_retry", violation.host, detail=violation.detail)
        self.count_decision(verdict)
        self._block(verdict)

    def _server_violation(self) -> None:
        """The backend's first flight is not TLS as a client expects it: fail closed."""
        self._watch = None
        self.runtime.stats["upstream_failures", "tls"] += 1
        self.reset()

    def eof_received(self) -> bool:
        if self._watch is not None and self._watch.holding:
            # The client ended its side with bytes still held: they cannot follow an EOF already passed on.
            self._watch = None
            self.reset()
            return False
        return super().eof_received()

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
        hello = bytes(self._hello.data)
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
        if self._watch is not None:
            if self._watch.awaiting_client:
                self._retry_violation(RetryViolation("no second ClientHello after HelloRetryRequest in time"))
            else:
                self._server_violation()  # the backend did not answer the hello in time
            return
        verdict = Verdict(Action.BLOCK, Reason.INVALID, "tls.hello_timeout", "", detail="no complete ClientHello")
        self.count_decision(verdict)
        self._block(verdict)

    def refuse_full(self) -> None:
        self.reset()

    def upstream_failed(self) -> None:
        self.runtime.stats["upstream_failures", "tls"] += 1
        self.close()
