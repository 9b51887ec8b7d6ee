"""The admin API's OpenAPI 3.0 document, served at /openapi.json; the suite runs schemathesis on it."""

from __future__ import annotations

from typing import Any

from .. import __version__
from ..policy.decide import Mode, Reason
from ..violations.store import DNS_STATES, HANDLING_STATES, MAX_NOTE, SET_STATES

_ERROR = {"$ref": "#/components/schemas/Error"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(_ERROR, description)


def _query(name: str, schema: dict[str, Any], description: str, required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": required, "schema": schema, "description": description}


_NULLABLE_STRING = {"type": "string", "nullable": True}
_IP = {"type": "string", "anyOf": [{"format": "ipv4"}, {"format": "ipv6"}]}
_SINCE = {  # a duration back from now, or an ISO 8601 date or time (UTC unless it says otherwise)
    "type": "string",
    "pattern": "^([0-9]{1,9}[smhd]|[1-9][0-9]{3}-(0[1-9]|1[0-2])-(0[1-9]|1[0-9]|2[0-8])"
    "(T([01][0-9]|2[0-3]):[0-5][0-9](:[0-5][0-9])?(Z|[+-](0[0-9]|1[0-3]):[0-5][0-9])?)?)$",
}
_DOMAIN = {"type": "string", "maxLength": 253, "pattern": "^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?[.])+[a-z]{2,63}$"}
_VIOLATION = {
    "type": "object",
    "required": ["id", "host", "ip", "port", "proto", "reason", "first_seen", "last_seen", "count", "blocked", "dns"],
    "properties": {
        "id": {"type": "integer"},
        "domain": {**_NULLABLE_STRING, "description": "the registrable domain; null for junk and overflow records"},
        "host": {"type": "string"},
        "ip": {"type": "string"},
        "port": {"type": "integer"},
        "proto": {"type": "string", "enum": ["http", "tls", "quic"]},
        "reason": {"type": "string", "enum": [reason.value for reason in Reason]},
        "first_seen": {"type": "string", "format": "date-time"},
        "last_seen": {"type": "string", "format": "date-time"},
        "count": {"type": "integer", "minimum": 1, "description": "requests or connections seen"},
        "blocked": {"type": "boolean"},
        "passed": {"type": "integer", "description": "of count, let through by monitor mode or a stale-feed mode"},
        "client": {**_NULLABLE_STRING, "description": "a sample client address, when violations.sample_client is on"},
        "dns": {
            "type": "object",
            "required": ["state", "addresses"],
            "properties": {
                "state": {"type": "string", "enum": list(DNS_STATES)},
                "addresses": {"type": "array", "items": {"type": "string"}},
                "detail": _NULLABLE_STRING,
                "checked_at": {**_NULLABLE_STRING, "format": "date-time"},
            },
        },
        "customer": {
            "type": "object",
            "nullable": True,
            "description": "the customer whose range holds the destination IP (icpgate customers import)",
            "required": ["name", "contract", "network"],
            "properties": {"name": {"type": "string"}, "contract": {"type": "string"}, "network": {"type": "string"}},
        },
        "handling": {
            "type": "object",
            "required": ["state", "note", "at"],
            "properties": {
                "state": {"type": "string", "enum": list(HANDLING_STATES)},
                "note": _NULLABLE_STRING,
                "at": {**_NULLABLE_STRING, "format": "date-time"},
                "by": {
                    **_NULLABLE_STRING,
                    "description": "set at the fleet's centre by this operator (role); null when set on this edge",
                },
            },
        },
        "current": {
            "type": "object",
            "nullable": True,
            "description": "the registry's decision now; null for junk and overflow records",
            "required": ["action", "reason"],
            "properties": {
                "action": {"type": "string", "enum": ["allow", "block"]},
                "reason": {"type": "string", "enum": [reason.value for reason in Reason]},
            },
        },
    },
}
_HANDLING_BODY = {
    "type": "object",
    "required": ["state"],
    "additionalProperties": False,
    "properties": {
        "state": {"type": "string", "enum": list(SET_STATES)},
        "note": {"type": "string", "maxLength": MAX_NOTE},
    },
}
_DECISION = {
    "type": "object",
    "required": ["host", "action", "reason", "rule"],
    "properties": {
        "host": {"type": "string"},
        "normalized": _NULLABLE_STRING,
        "host_kind": {"type": "string"},
        "registrable_domain": _NULLABLE_STRING,
        "destination": {"type": "object"},
        "matched": _NULLABLE_STRING,
        "action": {"type": "string", "enum": ["allow", "block"], "description": "what the gate does"},
        "policy_action": {"type": "string", "enum": ["allow", "block"], "description": "what the policy decided"},
        "mode": {"type": "string", "enum": [m.value for m in Mode], "description": "in force at the destination"},
        "mode_rule": _NULLABLE_STRING,
        "passed": {"type": "boolean", "description": "a block the mode lets through"},
        "reason": {"type": "string", "enum": [reason.value for reason in Reason]},
        "rule": {"type": "string"},
        "detail": _NULLABLE_STRING,
        "filing": {"type": "object", "nullable": True},
        "provider": {"type": "string"},
        "policy_pack": {"type": "string"},
    },
}
_CHECK = {"type": "object", "required": ["ok"], "properties": {"ok": {"type": "boolean"}}}
_READY = {
    "type": "object",
    "required": ["ready", "checks"],
    "properties": {
        "ready": {"type": "boolean"},
        "version": {"type": "string", "description": "The running daemon's version (docs/changelog.md)."},
        "mode": {"type": "string", "enum": [mode.value for mode in Mode]},
        "checks": {
            "type": "object",
            "properties": {"registry": _CHECK, "listeners": _CHECK, "feed": _CHECK, "enforcement": _CHECK},
        },
        "warnings": {
            "type": "array",
            "description": "What needs the operator without making the gate unready: a registry at registry.path"
            " that the gate does not enforce until it is adopted.",
            "items": {
                "type": "object",
                "required": ["check", "message"],
                "properties": {"check": {"type": "string", "enum": ["registry"]}, "message": {"type": "string"}},
            },
        },
    },
}


_TIME = {"type": "string", "nullable": True, "format": "date-time"}
_COUNTS = {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}}
_INSPECTION = {
    "type": "object",
    "required": ["enabled", "summary", "filings", "new_access"],
    "properties": {
        "enabled": {"type": "boolean"},
        "summary": {
            "type": "object",
            "required": ["last_pass", "last_complete", "domains", "filings", "filings_total", "hollow_share"],
            "properties": {
                "last_pass": {"type": "object", "nullable": True},
                "last_complete": _TIME,
                "domains": _COUNTS,  # by class: hosted, indirect, error, elsewhere, unresolved
                "filings": _COUNTS,  # by state: live, grace, unknown, hollow
                "filings_total": {"type": "integer", "minimum": 0},
                "hollow_share": {"type": "number", "minimum": 0, "maximum": 1},
                "hollow_alert_share": {"type": "number"},
                "grace_period": {"type": "number"},
            },
        },
        "filings": {
            "type": "object",
            "required": ["total", "limit", "offset", "next_offset", "items"],
            "properties": {
                "total": {"type": "integer", "minimum": 0},
                "limit": {"type": "integer"},
                "offset": {"type": "integer"},
                "next_offset": {"type": "integer", "nullable": True},
                "items": {"type": "array", "items": {
                    "type": "object",
                    "required": ["licence", "site_name", "subject_name", "access", "state", "since", "domains"],
                    "properties": {
                        "licence": {"type": "string"}, "site_name": {"type": "string"},
                        "subject_name": {"type": "string"}, "access": {"enum": ["active", "first_review"]},
                        "state": {"enum": ["live", "grace", "unknown", "hollow"]}, "since": _TIME,
                        "domains": {"type": "array", "items": {
                            "type": "object",
                            "required": ["domain", "class", "detail", "addresses", "checked_at"],
                            "properties": {
                                "domain": {"type": "string"},
                                "class": {"enum": ["hosted", "indirect", "error", "elsewhere", "unresolved"]},
                                "detail": {"type": "string"}, "addresses": {"type": "array", "items": _IP},
                                "checked_at": _TIME, "class_since": _TIME, "last_live": _TIME,
                            },
                        }},
                    },
                }},
            },
        },
        "new_access": {
            "type": "object",
            "required": ["customers", "hosts", "awaiting_dns"],
            "properties": {
                "customers": {"type": "array", "items": {"type": "object", "required": ["customer", "hosts"]}},
                "hosts": {"type": "integer", "minimum": 0},
                "awaiting_dns": {"type": "integer", "minimum": 0},
                "instructions": {"type": "object"},
            },
        },
    },
}  # fmt: skip

# The fleet's: the edge's report, and which edge inspected, every edge that shipped a pass, warnings.
_FLEET_INSPECTION = {**_INSPECTION, "required": [*_INSPECTION["required"], "inspection"], "properties": {
    **_INSPECTION["properties"],
    "inspection": {"type": "object", "required": ["edge", "site", "edges", "warnings"], "properties": {
        "edge": {"type": "string", "nullable": True}, "site": {"type": "string", "nullable": True},
        "edges": {"type": "array", "items": {"type": "object", "required": ["edge_id", "pass", "active"]}},
        "warnings": {"type": "array", "items": {"type": "string"}}}},
}}  # fmt: skip


def openapi_document() -> dict[str, Any]:
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "icpgate admin API",
            "version": __version__,
            "description": "Decisions, violations, filings and feed state of one icpgate node.",
        },
        "paths": {
            "/healthz": {
                "get": {
                    "summary": "The process answers.",
                    "responses": {
                        "200": _json({"type": "object", "properties": {"status": {"type": "string"}}}, "alive")
                    },
                }
            },
            "/readyz": {
                "get": {
                    "summary": "Registry loaded, listeners bound, feed not past max_staleness.",
                    "responses": {"200": _json(_READY, "ready"), "503": _json(_READY, "not ready")},
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics.",
                    "responses": {
                        "200": {
                            "description": "text exposition format",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            "/api/v1/decision": {
                "get": {
                    "summary": "The decision for a host on a destination, explained (as `icpgate check --json`).",
                    "parameters": [
                        _query("host", {"type": "string"}, "Host header or SNI, as a client would send it", True),
                        _query("ip", _IP, "destination IP address"),
                        _query("port", {"type": "integer", "minimum": 1, "maximum": 65535}, "destination port"),
                        _query(
                            "proto",
                            {"type": "string", "enum": ["http", "tls", "quic"], "default": "http"},
                            "listener kind",
                        ),
                        _query("path", {"type": "string"}, "request path (matters for the ACME exception)"),
                    ],
                    "responses": {
                        "200": _json(_DECISION, "the decision"),
                        "400": _error("bad parameters"),
                        "503": {"description": "the policy pack cannot be loaded"},
                    },
                }
            },
            "/api/v1/violations": {
                "get": {
                    "summary": "Violation records, confirmed first, then by count.",
                    "parameters": [
                        _query("confirmed", {"type": "boolean"}, "only DNS-confirmed records"),
                        _query("since", _SINCE, "last seen at or after: ISO 8601 time or 90s, 15m, 24h, 7d"),
                        _query("domain", {"type": "string", "minLength": 1}, "registrable domain or host"),
                        _query("ip", _IP, "destination IP"),
                        _query("reason", {"type": "string", "enum": [reason.value for reason in Reason]}, "reason"),
                        _query("dns", {"type": "string", "enum": list(DNS_STATES)}, "DNS state"),
                        _query(
                            "state",
                            {"type": "string", "enum": list(HANDLING_STATES)},
                            "handling state; open takes reopened in",
                        ),
                        _query(
                            "limit", {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}, "page size"
                        ),
                        _query(
                            "offset",
                            {"type": "integer", "minimum": 0, "maximum": 2**62, "default": 0},
                            "records to skip",
                        ),
                    ],
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "required": ["total", "limit", "offset", "next_offset", "items"],
                                "properties": {
                                    "total": {"type": "integer"},
                                    "limit": {"type": "integer"},
                                    "offset": {"type": "integer"},
                                    "next_offset": {"type": "integer", "nullable": True},
                                    "items": {"type": "array", "items": _VIOLATION},
                                },
                            },
                            "one page",
                        ),
                        "400": _error("bad parameters"),
                    },
                }
            },
            "/api/v1/violations/{id}/handling": {
                "post": {
                    "summary": "Acknowledge, resolve or reopen a violation record, with a note.",
                    "security": [{"bearer": []}],
                    "parameters": [
                        {
                            "name": "id",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "integer", "minimum": 0, "maximum": 2**62},
                        }
                    ],
                    "requestBody": {"required": True, "content": {"application/json": {"schema": _HANDLING_BODY}}},
                    "responses": {
                        "200": _json(_VIOLATION, "the record as it is now"),
                        "400": _error("bad body or id"),
                        "401": _error("no or wrong bearer token"),
                        "403": _error("no admin.token_file configured"),
                        "404": _error("no such record"),
                    },
                }
            },
            "/api/v1/filings/{domain}": {
                "get": {
                    "summary": "The filing that covers a domain (the name or a parent).",
                    "parameters": [{"name": "domain", "in": "path", "required": True, "schema": _DOMAIN}],
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "required": ["domain", "matched", "filing"],
                                "properties": {
                                    "domain": {"type": "string"},
                                    "matched": {"type": "string"},
                                    "filing": {"type": "object"},
                                },
                            },
                            "the filing",
                        ),
                        "400": _error("not a domain name"),
                        "404": _error("no filing covers it"),
                    },
                }
            },
            "/api/v1/feed": {
                "get": {
                    "summary": "Registry serial, freshness and the last sync outcomes.",
                    "responses": {"200": _json({"type": "object"}, "feed state")},
                }
            },
            "/api/v1/inspection": {
                "get": {
                    "summary": "Site inspection: its summary, the filings to review, and the hosts that need a new"
                    " access filing (新增接入) by customer (docs/inspection.md).",
                    "parameters": [
                        {
                            "name": "state",
                            "in": "query",
                            "style": "form",
                            "explode": True,
                            "schema": {"type": "array", "items": {"enum": ["live", "grace", "unknown", "hollow"]}},
                            "description": "filing states to list; repeatable (default: hollow, unknown, grace)",
                        },
                        _query(
                            "limit", {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}, "page size"
                        ),
                        _query(
                            "offset",
                            {"type": "integer", "minimum": 0, "maximum": 2**62, "default": 0},
                            "filings to skip",
                        ),
                    ],
                    "responses": {"200": _json(_INSPECTION, "the inspection report"), "400": _error("bad parameter")},
                }
            },
            "/api/v1/feed/sync": {
                "post": {
                    "summary": "Sync from the feed now.",
                    "security": [{"bearer": []}],
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "required": ["result"],
                                "properties": {"result": {"type": "string"}, "message": {"type": "string"}},
                            },
                            "the sync's outcome",
                        ),
                        "401": _error("no or wrong bearer token"),
                        "403": _error("no admin.token_file configured"),
                        "409": _error("no feed configured"),
                    },
                }
            },
            "/": {
                "get": {
                    "summary": "The status page.",
                    "responses": {
                        "200": {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}}
                    },
                }
            },
        },
        "components": {
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
            },
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


_FLEET_VIOLATION = {
    **_VIOLATION,
    "properties": {
        **_VIOLATION["properties"],
        "id": {"type": "integer", "description": "the fleet's number of the record (fleet.records)"},
        "edges": {
            "type": "array",
            "description": "the edges that saw it, with their counts, DNS states and handling",
            "items": {"type": "object", "required": ["edge_id", "site", "count"]},
        },
    },
}
_TRAIL_ENTRY = {
    "type": "object",
    "required": ["id", "state", "at", "role"],
    "properties": {
        "id": {"type": "integer"},
        "state": {"type": "string", "enum": list(SET_STATES)},
        "note": _NULLABLE_STRING,
        "at": {"type": "string", "format": "date-time"},
        "role": {"type": "string", "description": "the PostgreSQL role that set it"},
        "by": {**_NULLABLE_STRING, "description": "the name the operator gave"},
    },
}


def fleet_openapi_document() -> dict[str, Any]:
    """`icpgate fleet serve`'s document: the edge's read calls over the central store, all behind
    the bearer token but /healthz."""
    edge = openapi_document()
    listing = edge["paths"]["/api/v1/violations"]["get"]
    inspection = edge["paths"]["/api/v1/inspection"]["get"]
    page = listing["responses"]["200"]["content"]["application/json"]["schema"]
    unauthorized = {"401": _error("no or wrong bearer token"), "403": _error("no admin.token_file configured"),
                    "503": _error("the central store cannot be reached")}  # fmt: skip
    return {
        "openapi": "3.0.3",
        "info": {"title": "icpgate fleet API", "version": __version__,
                 "description": "Edges, violations and their handling across the fleet, from the central store."},
        "security": [{"bearer": []}],
        "paths": {
            "/healthz": {**edge["paths"]["/healthz"], "get": {**edge["paths"]["/healthz"]["get"], "security": []}},
            "/": {"get": {**edge["paths"]["/"]["get"], "summary": "The fleet's status page.",
                          "responses": {**edge["paths"]["/"]["get"]["responses"], **unauthorized}}},
            "/api/v1/edges": {"get": {
                "summary": "Every edge, its last heartbeat and its flags (as `icpgate fleet status --json`).",
                "responses": {"200": _json({"type": "object", "required": ["edges"], "properties": {
                    "edges": {"type": "array", "items": {"type": "object"}}}}, "the edges"), **unauthorized}}},
            "/api/v1/violations": {"get": {
                "summary": "Violation records across the fleet, one per record key, confirmed first.",
                "parameters": [*listing["parameters"], _query("edge", {"type": "string", "minLength": 1},
                               "seen at this edge (fleet.edge_id)"), _query("site", {"type": "string",
                               "minLength": 1}, "seen at this site (fleet.site)")],
                "responses": {"200": _json({**page, "properties": {**page["properties"], "items": {
                    "type": "array", "items": _FLEET_VIOLATION}}}, "one page"),
                    "400": _error("bad parameters"), "404": _error("an edge or site no edge reports"),
                    **unauthorized}}},
            "/api/v1/violations/{id}/handling": {"get": {
                "summary": "The audit trail of a record's handling at the centre, oldest first.",
                "parameters": [{"name": "id", "in": "path", "required": True,
                                "schema": {"type": "integer", "minimum": 0, "maximum": 2**62}}],
                "responses": {"200": _json({"type": "object", "required": ["id", "items"], "properties": {
                    "id": {"type": "integer"}, "items": {"type": "array", "items": _TRAIL_ENTRY}}}, "the trail"),
                    "400": _error("bad id"), **unauthorized}}},
            "/api/v1/inspection": {"get": {
                "summary": "Site inspection as the inspecting edge shipped it (its `icpgate inspect --report`), and the"
                " 新增接入 list over every edge's violations (docs/fleet.md).",
                "parameters": inspection["parameters"],
                "responses": {"200": _json(_FLEET_INSPECTION, "the inspection report"), "400": _error("bad parameter"),
                              **unauthorized}}},
        },
        "components": edge["components"],
    }  # fmt: skip
