"""What an inspection found, as data: the summary (domains by class, filings by state, the hollow
share), the filings to review, and the hosts that need a new access filing (新增接入).

The CLI, the admin API, the status page and the metrics all read these functions, so they agree.
Times are UTC ISO 8601 here; the table and the status page show them in `display.timezone`.
"""

from __future__ import annotations

from typing import Any

from ..config.settings import Config
from ..names.hostname import parent_names
from ..registry.filings import AccessStatus, FilingStatus
from ..registry.store import Registry
from ..violations.store import Filters, ViolationStore, iso
from .classify import CLASSES, STATE_GRACE, STATE_HOLLOW, STATE_UNKNOWN, STATES
from .store import InspectionStore

REVIEW_STATES = (STATE_HOLLOW, STATE_UNKNOWN, STATE_GRACE)  # what the report lists; live filings need nothing
MAX_NEW_ACCESS = 100_000  # violation records read for the 新增接入 list
# The block page's instructions for `filed_elsewhere` (policies/templates/messages.toml), for the customer.
NEW_ACCESS_TODO_ZH = "网站主办者须凭网站备案号和备案密码，在本接入服务商办理新增接入。"
NEW_ACCESS_TODO_EN = ("The site owner must request a new access filing (新增接入) at this provider, with the website"
                      " filing number and the filing password.")  # fmt: skip


async def summary(config: Config, store: InspectionStore | None, now: float) -> dict[str, Any]:
    """`store` None: nothing inspected yet."""
    classes, states = await store.counts(now, config.inspect.grace_period) if store else ({}, {})
    total = sum(states.values())
    last = await store.last_pass() if store else None
    return {
        "last_pass": _pass_json(last.to_json()) if last else None,
        "last_complete": iso(await store.last_complete()) if store else None,
        "domains": {klass: classes.get(klass, 0) for klass in CLASSES},
        "filings": {state: states.get(state, 0) for state in STATES},
        "filings_total": total,
        "hollow_share": states.get(STATE_HOLLOW, 0) / total if total else 0.0,
        "hollow_alert_share": config.inspect.hollow_alert_share,
        "grace_period": config.inspect.grace_period,
    }


async def report(config: Config, store: InspectionStore | None, now: float, limit: int, offset: int = 0,
                 states: tuple[str, ...] = REVIEW_STATES) -> dict[str, Any]:  # fmt: skip
    """The summary and one page of the filings in `states`, hollow the longest first."""
    total, items = await store.filings(states, now, config.inspect.grace_period, limit, offset) if store else (0, [])
    for item in items:
        item["since"] = iso(item["since"])
        for domain in item["domains"]:
            for key in ("checked_at", "class_since", "last_live"):
                domain[key] = iso(domain[key])
    return {"summary": await summary(config, store, now),
            "filings": {"total": total, "limit": limit, "offset": offset, "items": items}}  # fmt: skip


async def new_access(config: Config, violations: ViolationStore | None, registry: Registry) -> dict[str, Any]:
    """Hosts blocked on our addresses as `filed_elsewhere` whose DNS confirms they are served here,
    still filed without our access now, grouped by customer (the customer map): each customer
    must file a new access record (新增接入) for them. Records DNS has not checked yet are counted.
    `violations` None: no violation log yet."""
    records, unchecked = [], 0
    if violations is not None:
        _, records = await violations.query(NEW_ACCESS_FILTERS, MAX_NEW_ACCESS)
        unchecked, _ = await violations.query(AWAITING_DNS_FILTERS, 0)
    return await new_access_of(config, records, unchecked, registry)


NEW_ACCESS_FILTERS = Filters(confirmed=True, reason="filed_elsewhere")
AWAITING_DNS_FILTERS = Filters(reason="filed_elsewhere", dns="unchecked")


async def new_access_of(config: Config, records: list[dict[str, Any]], unchecked: int,
                        registry: Registry | None) -> dict[str, Any]:  # fmt: skip
    """The 新增接入 list from violation records in `icpgate violations`' shape (an edge's log, or
    the fleet's central store). `registry` None (none on this machine): each host is listed as the
    violation log has it, with no filing looked up now (its licence empty)."""
    hosts: dict[tuple, dict[str, Any]] = {}
    for record in records:
        licence = "" if registry is None else await _still_elsewhere(config, registry, record["host"])
        if licence is None:
            continue
        customer = record["customer"] or {}
        key = (customer.get("name", ""), customer.get("contract", ""), record["host"])
        entry = hosts.setdefault(key, {
            "host": record["host"], "domain": record["domain"], "licence": licence, "destinations": [],
            "count": 0, "first_seen": record["first_seen"], "last_seen": record["last_seen"],
            "resolves_to": record["dns"]["addresses"], "violation_ids": [],
        })  # fmt: skip
        destination = "%s:%d/%s" % (record["ip"], record["port"], record["proto"])
        entry["destinations"] = sorted({*entry["destinations"], destination})
        entry["count"] += record["count"]
        entry["first_seen"] = min(entry["first_seen"], record["first_seen"])
        entry["last_seen"] = max(entry["last_seen"], record["last_seen"])
        entry["violation_ids"].append(record["id"])
    customers: dict[tuple[str, str], list] = {}
    for (name, contract, _), entry in sorted(hosts.items(), key=lambda item: (not item[0][0], item[0])):
        customers.setdefault((name, contract), []).append(entry)
    return {
        "customers": [{"customer": {"name": name, "contract": contract} if name else None, "hosts": entries}
                      for (name, contract), entries in customers.items()],
        "hosts": len(hosts),
        "awaiting_dns": unchecked,
        "instructions": {"zh": NEW_ACCESS_TODO_ZH, "en": NEW_ACCESS_TODO_EN},
    }  # fmt: skip


async def _still_elsewhere(config: Config, registry: Registry, host: str) -> str | None:
    """The licence of the approved filing that covers `host` with no access record of ours now; None
    when there is none (our access was filed since, or the filing is gone)."""
    index = await registry.index_for(list(parent_names(host)))
    match = index.lookup(host)
    if match is None or match.filing.status is not FilingStatus.APPROVED:
        return None
    ours = (AccessStatus.ACTIVE, AccessStatus.FIRST_REVIEW)
    if any(access.provider == config.provider.id and access.status in ours for access in match.filing.access):
        return None
    return match.filing.licence


def _pass_json(run: dict[str, Any]) -> dict[str, Any]:
    return run | {"started": iso(run["started"]), "finished": iso(run["finished"])}
