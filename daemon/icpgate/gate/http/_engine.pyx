# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""The compiled HTTP engine: the common request head read in one pass of llhttp, in C.

`read_plain_head` takes the bytes of one read and answers with the parts of the request head, or
None: "take the Python path". It answers only for the plainest request, the one that is nearly
every request of a keep-alive connection: one whole header section ending exactly at the end of
the read, origin-form target, HTTP/1.0 or 1.1, exactly one Host of visible ASCII, no
Content-Length, Transfer-Encoding or Upgrade, and no CONNECT. Everything else, every refusal
included, goes to the pure-Python inspector (inspector.py), which stays the reference: for every
read this answers, the inspector yields the same request head (tests/test_http_engine.py holds the
two equal on generated and mutated requests).

llhttp is the same parser, with the same (strict) settings, that httptools runs for the inspector,
vendored from httptools' source distribution (llhttp/, MIT). The callbacks are C functions that
note where each part lies in the buffer; Python objects are made once, at the end.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_Contains, PyDict_SetItem
from cpython.unicode cimport PyUnicode_DecodeASCII
from libc.stdint cimport int32_t, uint8_t
from libc.string cimport memcmp


cdef extern from "llhttp.h":
    ctypedef struct llhttp_t:
        int32_t error
        void *data
        uint8_t method
        uint8_t http_major
        uint8_t http_minor
        uint8_t upgrade

    ctypedef int (*llhttp_data_cb)(llhttp_t*, const char *at, size_t length) noexcept
    ctypedef int (*llhttp_cb)(llhttp_t*) noexcept

    ctypedef struct llhttp_settings_t:
        llhttp_data_cb on_url
        llhttp_data_cb on_header_field
        llhttp_data_cb on_header_value
        llhttp_cb on_headers_complete
        llhttp_cb on_message_complete
        llhttp_cb on_header_value_complete

    ctypedef enum llhttp_type_t:
        HTTP_REQUEST

    ctypedef enum llhttp_errno_t:
        HPE_OK

    ctypedef enum llhttp_method_t:
        HTTP_CONNECT

    void llhttp_init(llhttp_t *parser, llhttp_type_t type, const llhttp_settings_t *settings)
    void llhttp_settings_init(llhttp_settings_t *settings)
    llhttp_errno_t llhttp_execute(llhttp_t *parser, const char *data, size_t len)
    const char *llhttp_method_name(llhttp_method_t method)
    int llhttp_should_keep_alive(const llhttp_t *parser)


cdef enum:
    MAX_FIELDS = 64  # more header lines than this: the Python path reads them

cdef struct Span:
    const char *at
    size_t length

cdef struct Head:
    Span url
    Span names[MAX_FIELDS]
    Span values[MAX_FIELDS]
    int fields  # header lines seen; above MAX_FIELDS only counted
    int url_parts
    bint headers_done
    bint complete
    bint keep_alive


cdef int _on_url(llhttp_t *parser, const char *at, size_t length) noexcept:
    cdef Head *head = <Head *>parser.data
    head.url.at = at
    head.url.length = length
    head.url_parts += 1
    return 0


cdef int _on_header_field(llhttp_t *parser, const char *at, size_t length) noexcept:
    cdef Head *head = <Head *>parser.data
    if head.fields < MAX_FIELDS:
        head.names[head.fields].at = at
        head.names[head.fields].length = length
        head.values[head.fields].at = at
        head.values[head.fields].length = 0
    return 0


cdef int _on_header_value(llhttp_t *parser, const char *at, size_t length) noexcept:
    cdef Head *head = <Head *>parser.data
    if head.fields < MAX_FIELDS:
        head.values[head.fields].at = at
        head.values[head.fields].length = length
    return 0


cdef int _on_header_value_complete(llhttp_t *parser) noexcept:
    (<Head *>parser.data).fields += 1
    return 0


cdef int _on_headers_complete(llhttp_t *parser) noexcept:
    (<Head *>parser.data).headers_done = True
    return 0


cdef int _on_message_complete(llhttp_t *parser) noexcept:
    cdef Head *head = <Head *>parser.data
    head.complete = True
    # Read now: llhttp clears the flags it is made of once the message is complete.
    head.keep_alive = llhttp_should_keep_alive(parser)
    return 0


cdef llhttp_settings_t _settings
llhttp_settings_init(&_settings)
_settings.on_url = _on_url
_settings.on_header_field = _on_header_field
_settings.on_header_value = _on_header_value
_settings.on_header_value_complete = _on_header_value_complete
_settings.on_headers_complete = _on_headers_complete
_settings.on_message_complete = _on_message_complete


cdef inline bint _is_name(Span name, const char *lower) noexcept:
    """`name` is `lower` in any case (ASCII; `lower` holds no letters outside a-z and '-')."""
    cdef size_t i
    cdef char c
    for i in range(name.length):
        c = name.at[i]
        if c >= b'A' and c <= b'Z':
            c = c + 32
        if c != lower[i] or lower[i] == 0:
            return False
    return lower[name.length] == 0


cdef inline Span _strip(Span value) noexcept:
    """Without the spaces and tabs around it, as `bytes.strip(b" \\t")`."""
    while value.length and (value.at[0] == b' ' or value.at[0] == b'\t'):
        value.at += 1
        value.length -= 1
    while value.length and (value.at[value.length - 1] == b' ' or value.at[value.length - 1] == b'\t'):
        value.length -= 1
    return value


cdef inline bytes _lower_bytes(Span span):
    """A new bytes object, filled here: given the characters, CPython would return its shared object
    for a one-byte string, and lowering that in place would change b"Q" for the whole process."""
    if span.length == 0:
        return b""
    cdef bytes result = PyBytes_FromStringAndSize(NULL, span.length)
    cdef char *out = PyBytes_AS_STRING(result)
    cdef size_t i
    cdef char c
    for i in range(span.length):
        c = span.at[i]
        out[i] = c + 32 if b'A' <= c <= b'Z' else c
    return result


cdef inline bint _visible_ascii(Span span) noexcept:
    cdef size_t i
    if span.length == 0:
        return False
    for i in range(span.length):
        if span.at[i] < 0x21 or span.at[i] > 0x7e:
            return False
    return True


def read_plain_head(object data, Py_ssize_t max_header_size):
    """(method, target, version, host, headers) of the plain request head that is exactly `data`,
    or None for anything else (the Python path decides those). `headers`: lower-case names, the
    first value of each, without surrounding spaces and tabs, as the inspector keeps them."""
    if not PyBytes_CheckExact(data):
        return None
    cdef const char *at = PyBytes_AS_STRING(data)
    cdef Py_ssize_t size = PyBytes_GET_SIZE(data)
    cdef Py_ssize_t i
    cdef llhttp_t parser
    cdef Head head
    if size > max_header_size or size < 4 or memcmp(at + size - 4, b"\r\n\r\n", 4) != 0:
        return None
    if at[0] == b'\r' or (size >= 12 and memcmp(at, b"PRI * HTTP/2", 12) == 0):
        return None
    for i in range(size - 4):  # the header section must end only at the end of the read
        if at[i] == b'\r' and at[i + 1] == b'\n' and at[i + 2] == b'\r' and at[i + 3] == b'\n':
            return None
    head.url_parts = 0
    head.fields = 0
    head.headers_done = False
    head.complete = False
    head.keep_alive = False
    llhttp_init(&parser, HTTP_REQUEST, &_settings)
    parser.data = &head
    if llhttp_execute(&parser, at, <size_t>size) != HPE_OK:
        return None  # an error, or an Upgrade or CONNECT head (paused): the Python path
    if not (head.headers_done and head.complete) or head.url_parts != 1 or head.fields > MAX_FIELDS:
        return None
    if not head.keep_alive:
        # After this one llhttp reads no further request: the inspector's parser must read it, and
        # every request after it (the inspector uses this engine only while its parser has read nothing).
        return None
    if parser.upgrade or parser.method == HTTP_CONNECT or parser.http_major != 1 or parser.http_minor > 1:
        return None
    if head.url.length == 0 or head.url.at[0] != b'/':
        return None  # asterisk, authority and absolute forms are for the Python path
    cdef Span host
    cdef int hosts = 0
    cdef int n
    for n in range(head.fields):
        if _is_name(head.names[n], b"host"):
            hosts += 1
            host = _strip(head.values[n])
        elif (_is_name(head.names[n], b"content-length") or _is_name(head.names[n], b"transfer-encoding")
                or _is_name(head.names[n], b"upgrade")):
            return None
    if hosts != 1 or not _visible_ascii(host):
        return None
    cdef dict headers = {}
    cdef bytes name
    cdef Span value
    for n in range(head.fields):
        name = _lower_bytes(head.names[n])
        if not PyDict_Contains(headers, name):
            value = _strip(head.values[n])
            PyDict_SetItem(headers, name, PyBytes_FromStringAndSize(value.at, value.length))
    method = llhttp_method_name(<llhttp_method_t>parser.method).decode("ascii")
    target = PyBytes_FromStringAndSize(head.url.at, head.url.length)
    version = "1.1" if parser.http_minor == 1 else "1.0"
    return method, target, version, PyUnicode_DecodeASCII(host.at, host.length, NULL), headers


cdef inline bint _line_is(const char *line, const char *end, const char *lower) noexcept:
    """The line at `line` starts with `lower` (ASCII letters in any case)."""
    cdef char c
    while lower[0] != 0:
        if line >= end:
            return False
        c = line[0]
        if c >= b'A' and c <= b'Z':
            c = c + 32
        if c != lower[0]:
            return False
        line += 1
        lower += 1
    return True


def whole_plain_response(object data, Py_ssize_t max_head_size):
    """True when `data` is exactly one whole final response with a body framed by one
    Content-Length: a status line of 200 to 599 other than 204 and 304, CRLF line ends only, one
    Content-Length of at most 18 digits, no Transfer-Encoding, and that many body bytes after the
    head. False for anything else (the Python tracker frames those, and decides what an
    answer to a HEAD request, an Upgrade or CONNECT means)."""
    if not PyBytes_CheckExact(data):
        return False
    cdef const char *at = PyBytes_AS_STRING(data)
    cdef Py_ssize_t size = PyBytes_GET_SIZE(data)
    cdef Py_ssize_t i = 0, head_end = -1, length_at = -1, lengths = 0, digits = 0
    cdef long long length = 0
    cdef int status
    cdef unsigned char c
    # The status line: HTTP/1.x, three digits, then a space and a reason phrase, or nothing.
    if size < 17 or memcmp(at, b"HTTP/1.", 7) != 0 or (at[7] != b'0' and at[7] != b'1') or at[8] != b' ':
        return False
    if not (b'1' <= at[9] <= b'9' and b'0' <= at[10] <= b'9' and b'0' <= at[11] <= b'9'):
        return False
    status = (at[9] - 48) * 100 + (at[10] - 48) * 10 + (at[11] - 48)
    if status < 200 or status == 204 or status == 304:
        return False
    i = 12
    if at[i] == b' ':
        i += 1
        while i < size:
            c = <unsigned char>at[i]
            if c != b'\t' and c != b' ' and (c < 0x21 or c == 0x7f):
                break
            i += 1
    if i + 1 >= size or at[i] != b'\r' or at[i + 1] != b'\n':
        return False
    i += 2
    # The header lines: every CR ends a line and every LF follows a CR; find the framing fields.
    while i < size and i < max_head_size:
        if at[i] == b'\r':
            if i + 1 < size and at[i + 1] == b'\n':
                head_end = i + 2
            break
        if _line_is(at + i, at + size, b"transfer-encoding:"):
            return False
        if _line_is(at + i, at + size, b"content-length:"):
            lengths += 1
            length_at = i + 15
        while i < size and i < max_head_size and at[i] != b'\r':
            if at[i] == b'\n':
                return False
            i += 1
        if i >= max_head_size or i + 1 >= size or at[i + 1] != b'\n':  # too long, or a bare CR
            return False
        i += 2
    if head_end < 0 or head_end > max_head_size or lengths != 1:
        return False
    i = length_at
    while at[i] == b' ' or at[i] == b'\t':
        i += 1
    while b'0' <= at[i] <= b'9':
        length = length * 10 + (at[i] - 48)
        digits += 1
        if digits > 18:
            return False
        i += 1
    while at[i] == b' ' or at[i] == b'\t':
        i += 1
    if digits == 0 or at[i] != b'\r':
        return False
    return length == size - head_end
