"""Plaintext HTTP/1.x listeners: every request on the connection is checked before it is forwarded,
and every response is framed, so the gate knows which request each answer belongs to."""

from __future__ import annotations

import logging

from ...policy.decide import Action, Reason, Verdict
from ..blockpage import error_response, new_request_id
from ..connection import GateConnection
from .framing import FramingError
from .inspector import Body, Head, HttpInspector, Invalid, RequestHead, Tunnel
from .responses import ResponseTracker

log = logging.getLogger("icpgate.gate")

MAX_RESPONSE_HEAD = 64 * 1024
WEBSOCKET = b"websocket"
H2C = b"h2c"


class HttpConnection(GateConnection):
    kind = "http"
    __slots__ = ("_eof_held", "_final_answer", "_responses", "_tunnel", "inspector")

    def __init__(self, listener) -> None:
        super().__init__(listener)
        self.inspector = HttpInspector(self.runtime.gate.max_header_size)
        self._responses = ResponseTracker(MAX_RESPONSE_HEAD)
        self._tunnel = False
        self._final_answer: bytes | None = None  # a block to send once earlier requests are answered
        self._eof_held = False  # the client's EOF came while bytes wait for an Upgrade's answer

    def inspect(self, data: bytes) -> None:
        if self._tunnel:
            self.send_upstream(data)
            return
        if self._final_answer is not None:
            return  # blocked: waiting for the backend to finish earlier answers; ignore the rest
        started_head = not self.inspector.in_head
        for event in self.inspector.feed(data):
            if isinstance(event, Head):
                if not self._on_head(event):
                    return
            elif isinstance(event, Body):
                self.send_upstream(event.raw)
            elif isinstance(event, Tunnel):
                self._tunnel = True
                self.send_upstream(event.raw)
            elif isinstance(event, Invalid):
                verdict = Verdict(Action.BLOCK, Reason.INVALID, "http.framing", "", detail=event.message)
                self.count_decision(verdict)
                self._block(verdict, None, at_once=event.mid_message)
                return
        if self.inspector.in_head and (started_head or self._deadline is None):
            # A new head has begun (in this read, or behind an allowed one): it gets its own deadline.
            self.restart_inspect_deadline()

    def _on_head(self, head: Head) -> bool:
        """Decide one request; forward its head and return True when it is allowed."""
        request = head.request
        verdict = self._protocol_refusal(request)
        if verdict is not None:
            self.count_decision(verdict)
        else:
            verdict = self.decide(request.host, request.path)
        if verdict.action is Action.BLOCK:
            self._block(verdict, request)
            return False
        self.inspection_done()
        self._responses.expect(request.method == "HEAD", request.switch)
        self.send_upstream(head.raw)
        return True

    def _protocol_refusal(self, request: RequestHead) -> Verdict | None:
        """Refusals that are about the request, not the host: malformed heads, h2c, CONNECT."""
        pack = self.runtime.policy.pack
        if request.error:
            return Verdict(Action.BLOCK, Reason.INVALID, "http.request", request.host or "", detail=request.error)
        for token in request.upgrade:
            # The backend may pick any token of the list: every one must be one the gate allows.
            if token == H2C:
                if pack.h2c is Action.BLOCK:
                    return Verdict(Action.BLOCK, Reason.INVALID, "rules.h2c", request.host or "", detail="h2c upgrade")
            elif token != WEBSOCKET:
                detail = "upgrade to %s" % token.decode("ascii")
                return Verdict(Action.BLOCK, Reason.INVALID, "http.upgrade", request.host or "", detail=detail)
        if request.method == "CONNECT" and pack.connect is Action.BLOCK:
            return Verdict(Action.BLOCK, Reason.INVALID, "rules.connect", request.host or "", detail="CONNECT")
        return None

    def _block(self, verdict: Verdict, request: RequestHead | None, *, at_once: bool = False) -> None:
        request_id = new_request_id()
        answer = self.runtime.pages.http_response(
            verdict,
            request_id,
            json_body=request is not None and request.accepts_json(),
            head_only=request is not None and request.method == "HEAD",
        )
        self.runtime.stats["blocks", "http", verdict.reason] += 1
        self.record_violation(verdict, request_id)
        if at_once or self._responses.idle:
            # Nothing is owed to the client, or it broke the framing mid-message (the backend
            # holds a request it will never see the end of): answer now.
            self.reply_and_close(answer)
            return
        # Earlier requests went to the backend: their answers come first, then the block.
        self._final_answer = answer
        self.pause_client_reading("blocked")
        self.restart_inspect_deadline()  # bounds the wait for the backend

    def on_upstream_data(self, data: bytes) -> None:
        responses = self._responses
        if responses.tunnel:
            self.transport.write(data)
            return
        try:
            passed = responses.feed(data, self._final_answer is not None)
        except FramingError as error:
            self.runtime.stats["upstream_protocol_errors", "http"] += 1
            log.warning("closed a connection from %s: unreadable response from the backend: %s", self.client[0], error)
            self.abort()
            return
        self.transport.write(data if passed == len(data) else data[:passed])
        if responses.switched is not None:
            accepted, responses.switched = responses.switched, None
            self.inspector.switch_answered(accepted)
            self.inspect(b"")  # what the client sent meanwhile: tunnel it, or inspect it as HTTP
            if self._eof_held and not self._closing and not self.inspector.awaiting_switch:
                self._eof_held = False
                super().eof_received()  # now that the held bytes have gone on, pass the EOF
        if self._final_answer is not None and responses.idle:
            self._send_final_answer()

    def eof_received(self) -> bool:
        if self.inspector.awaiting_switch:
            # Bytes sent after an Upgrade wait for its answer; the EOF must follow them, not pass them.
            self._eof_held = True
            return True
        return super().eof_received()

    def upstream_eof(self) -> bool:
        if self._final_answer is not None:
            self._send_final_answer()
            return False
        if not self._responses.tunnel:
            # A backend that ends an HTTP connection answers nothing more on it: end the client's too,
            # once what it sent has been written.
            self.close()
            return False
        return super().upstream_eof()

    def upstream_lost(self, exc: Exception | None) -> None:
        if self._final_answer is not None:
            self.upstream = None
            self._send_final_answer()
            return
        super().upstream_lost(exc)

    def _send_final_answer(self) -> None:
        answer, self._final_answer = self._final_answer, None
        if answer is not None:
            self.reply_and_close(answer)

    def inspection_timed_out(self) -> None:
        if self._final_answer is not None:
            self._send_final_answer()  # the backend did not finish in time: block now
            return
        message = "request header section not complete within %gs" % self.runtime.gate.inspect_timeout
        verdict = Verdict(Action.BLOCK, Reason.INVALID, "http.header_timeout", "", detail=message)
        self.count_decision(verdict)
        self._block(verdict, None)

    def refuse_full(self) -> None:
        self.reply_and_close(error_response(503, "too many connections", new_request_id()))

    def upstream_failed(self) -> None:
        self.runtime.stats["upstream_failures", "http"] += 1
        self.reply_and_close(error_response(502, "the site's server cannot be reached", new_request_id()))
