"""The central store's schema in PostgreSQL, its versioned migrations and the roles' SQL (docs/fleet.md).

Everything lives in the `fleet` schema. The current aggregates (`fleet.violations`) are an ordinary
table updated in place; the history (`fleet.violation_deltas`) is immutable, one row per shipped
change, in monthly partitions that retention drops whole (an `ON CONFLICT` update cannot move a
row between partitions, hence the split). Row-level security keyed on `current_user` keeps each
edge's role to its own rows; it holds behind pgbouncer's transaction pooling, where a session
setting would not.
"""

from __future__ import annotations

EDGE_GROUP = "icpgate_edge"  # every edge's login role is a member; the grants and policies name it
READER_GROUP = "icpgate_reader"  # dashboards, `fleet status|violations`, `fleet serve`
OPERATOR_GROUP = "icpgate_operator"  # readers who may also handle records (`fleet violations ack|resolve|reopen`)
OWNER = "icpgate_owner"  # runs `fleet migrate` and `fleet maintain`, owns every object

_OWN_ROWS = "role = current_user"
# An edge writes only under a UUID it registered itself: the edges table's key settles who that is.
_OWN_EDGE = _OWN_ROWS + " AND edge_uuid IN (SELECT edge_uuid FROM fleet.edges WHERE role = current_user)"
_TABLES = ("edges", "ship_marks", "violations", "violation_deltas")
_INSPECTION_TABLES = ("inspection_filings", "inspection_domains", "inspection_seen", "inspection_passes")
_KEY = "host, ip, port, proto, reason"
_SAME_KEY = " AND ".join("v.%s = handling.%s" % (column, column) for column in _KEY.split(", "))

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: edges and their heartbeats, shipping marks, current aggregates, the partitioned history.
    (
        """CREATE TABLE fleet.edges (
            edge_uuid uuid PRIMARY KEY,           -- made once by the edge, kept in its violation log
            role name NOT NULL DEFAULT current_user,
            edge_id text NOT NULL,                -- fleet.edge_id: a label for people
            site text NOT NULL,
            version text, config_digest text,
            mode text,                            -- enforce, monitor or open (a stale feed's mode)
            mode_rule text,                       -- the key that set it
            registry_serial bigint, registry_checksum text, registry_filings bigint,
            feed_state text, feed_age double precision,
            workers integer, workers_ready integer, open_connections bigint,
            decisions bigint, blocks bigint,
            backlog bigint, oldest_unshipped_age double precision, dropped bigint,
            started_at timestamptz, last_seen timestamptz NOT NULL DEFAULT now()
        )""",
        """CREATE TABLE fleet.ship_marks (
            edge_uuid uuid PRIMARY KEY REFERENCES fleet.edges,
            role name NOT NULL DEFAULT current_user,
            shipped_seq bigint NOT NULL DEFAULT 0,  -- every local change up to this one is here
            shipped_at timestamptz
        )""",
        """CREATE TABLE fleet.violations (
            edge_uuid uuid NOT NULL REFERENCES fleet.edges,
            role name NOT NULL DEFAULT current_user,
            host text NOT NULL, ip text NOT NULL, port integer NOT NULL, proto text NOT NULL, reason text NOT NULL,
            domain text NOT NULL,                 -- '' for junk and overflow
            first_seen timestamptz NOT NULL, last_seen timestamptz NOT NULL,
            count bigint NOT NULL, passed bigint NOT NULL,
            client text,
            dns_state text, dns_addresses jsonb NOT NULL DEFAULT '[]', dns_detail text, dns_checked_at timestamptz,
            handling_state text NOT NULL, handling_note text, handling_at timestamptz,
            local_id bigint NOT NULL,             -- the edge's record (a new one after local expiry)
            local_count bigint NOT NULL, local_passed bigint NOT NULL,
            change_seq bigint NOT NULL, changed_at timestamptz NOT NULL,
            shipped_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (edge_uuid, host, ip, port, proto, reason)
        )""",
        "CREATE INDEX violations_last_seen ON fleet.violations (last_seen)",
        "CREATE INDEX violations_domain ON fleet.violations (domain)",
        """CREATE TABLE fleet.violation_deltas (
            bucket timestamptz NOT NULL,          -- the hour of the change's last sighting
            edge_uuid uuid NOT NULL,
            role name NOT NULL DEFAULT current_user,
            site text NOT NULL, edge_id text NOT NULL,
            host text NOT NULL, ip text NOT NULL, port integer NOT NULL, proto text NOT NULL, reason text NOT NULL,
            domain text NOT NULL,
            count bigint NOT NULL, passed bigint NOT NULL,
            first_sighting boolean NOT NULL,      -- the record's first delta at the centre
            change_seq bigint NOT NULL,
            changed_at timestamptz NOT NULL,      -- when the edge wrote it: far behind shipped_at is backlog
            shipped_at timestamptz NOT NULL DEFAULT now(),
            UNIQUE (edge_uuid, change_seq, bucket) -- never twice, whatever a shipper does
        ) PARTITION BY RANGE (bucket)""",
        # Edges have no DDL right: they ask for the month they ship into, the owner makes it.
        """CREATE FUNCTION fleet.ensure_partition(moment timestamptz) RETURNS void
        LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
        DECLARE
            start timestamptz := date_trunc('month', moment AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
            name text := 'violation_deltas_' || to_char(moment AT TIME ZONE 'UTC', 'YYYYMM');
        BEGIN
            IF moment > now() + interval '40 days' THEN
                RAISE EXCEPTION 'a change dated %, in the future: is the edge''s clock right?', moment;
            END IF;
            IF to_regclass('fleet.' || name) IS NULL THEN
                EXECUTE format('CREATE TABLE fleet.%I PARTITION OF fleet.violation_deltas FOR VALUES FROM (%L) TO (%L)',
                               name, start, start + interval '1 month');
            END IF;
        EXCEPTION WHEN duplicate_table OR unique_violation THEN
            NULL;  -- another edge made it at the same moment
        END $$""",
        "REVOKE ALL ON FUNCTION fleet.ensure_partition(timestamptz) FROM PUBLIC",
        "GRANT USAGE ON SCHEMA fleet TO %s, %s" % (EDGE_GROUP, READER_GROUP),
        "GRANT SELECT, INSERT, UPDATE ON fleet.edges, fleet.ship_marks, fleet.violations TO %s" % EDGE_GROUP,
        "GRANT SELECT, INSERT ON fleet.violation_deltas TO %s" % EDGE_GROUP,  # immutable: no UPDATE
        "GRANT EXECUTE ON FUNCTION fleet.ensure_partition(timestamptz) TO %s" % EDGE_GROUP,
        "GRANT SELECT ON fleet.edges, fleet.ship_marks, fleet.violations, fleet.violation_deltas TO %s"
        % READER_GROUP,
        *("ALTER TABLE fleet.%s ENABLE ROW LEVEL SECURITY" % table for table in _TABLES),
        *("CREATE POLICY own_rows ON fleet.%s TO %s USING (%s) WITH CHECK (%s)"
          % (table, EDGE_GROUP, _OWN_ROWS, _OWN_ROWS if table == "edges" else _OWN_EDGE) for table in _TABLES),
        *("CREATE POLICY read_all ON fleet.%s FOR SELECT TO %s USING (true)" % (table, READER_GROUP)
          for table in _TABLES),
    ),
    # 2: central handling. A stable number per record key across the fleet (what an operator types),
    # the handling set at the centre, and its audit trail: who (the role, and the name given), when, why.
    (
        """CREATE TABLE fleet.records (
            id bigserial PRIMARY KEY,
            host text NOT NULL, ip text NOT NULL, port integer NOT NULL, proto text NOT NULL, reason text NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now(),
            UNIQUE (host, ip, port, proto, reason)
        )""",
        "INSERT INTO fleet.records (%s) SELECT %s FROM fleet.violations GROUP BY %s ORDER BY min(first_seen), %s"
        % (_KEY, _KEY, _KEY, _KEY),
        # Edges have no right on it: the owner numbers each key when an edge first ships it.
        """CREATE FUNCTION fleet.number_record() RETURNS trigger
        LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
        BEGIN
            INSERT INTO fleet.records (host, ip, port, proto, reason)
            VALUES (NEW.host, NEW.ip, NEW.port, NEW.proto, NEW.reason) ON CONFLICT DO NOTHING;
            RETURN NULL;
        END $$""",
        "REVOKE ALL ON FUNCTION fleet.number_record() FROM PUBLIC",
        "CREATE TRIGGER violations_numbered AFTER INSERT ON fleet.violations FOR EACH ROW"
        " EXECUTE FUNCTION fleet.number_record()",
        """CREATE TABLE fleet.handling (
            record_id bigint PRIMARY KEY REFERENCES fleet.records ON DELETE CASCADE,
            host text NOT NULL, ip text NOT NULL, port integer NOT NULL, proto text NOT NULL, reason text NOT NULL,
            state text NOT NULL CHECK (state IN ('open', 'acknowledged', 'resolved')),
            note text NOT NULL, at timestamptz NOT NULL DEFAULT now(),
            role name NOT NULL DEFAULT current_user,  -- who: the operator's PostgreSQL role
            by_name text                              -- and the name they gave (--by)
        )""",
        "CREATE INDEX handling_key ON fleet.handling (%s)" % _KEY,
        """CREATE TABLE fleet.handling_log (
            id bigserial PRIMARY KEY,
            record_id bigint NOT NULL REFERENCES fleet.records ON DELETE CASCADE,
            state text NOT NULL, note text NOT NULL, at timestamptz NOT NULL DEFAULT now(),
            role name NOT NULL DEFAULT current_user, by_name text
        )""",
        "CREATE INDEX handling_log_record ON fleet.handling_log (record_id, id)",
        "GRANT SELECT ON fleet.records, fleet.handling, fleet.handling_log TO %s" % READER_GROUP,
        "GRANT INSERT, UPDATE ON fleet.handling TO %s" % OPERATOR_GROUP,
        "GRANT INSERT ON fleet.handling_log TO %s" % OPERATOR_GROUP,  # an audit trail: no UPDATE, no DELETE
        "GRANT USAGE ON SEQUENCE fleet.handling_log_id_seq TO %s" % OPERATOR_GROUP,
        "GRANT SELECT ON fleet.handling TO %s" % EDGE_GROUP,  # to take back the handling of its own records
        "ALTER TABLE fleet.handling ENABLE ROW LEVEL SECURITY",
        "ALTER TABLE fleet.handling_log ENABLE ROW LEVEL SECURITY",
        *("CREATE POLICY read_all ON fleet.%s FOR SELECT TO %s USING (true)" % (table, READER_GROUP)
          for table in ("handling", "handling_log")),
        # Who is recorded is who is connected: a row names no other role.
        "CREATE POLICY operators_insert ON fleet.handling FOR INSERT TO %s WITH CHECK (role = current_user)"
        % OPERATOR_GROUP,
        "CREATE POLICY operators_update ON fleet.handling FOR UPDATE TO %s USING (true) WITH CHECK (role ="
        " current_user)" % OPERATOR_GROUP,
        "CREATE POLICY operators_log ON fleet.handling_log FOR INSERT TO %s WITH CHECK (role = current_user)"
        % OPERATOR_GROUP,
        # An edge sees the handling of the keys it holds itself (fleet.violations' own_rows policy).
        "CREATE POLICY own_records ON fleet.handling FOR SELECT TO %s USING (EXISTS (SELECT 1 FROM"
        " fleet.violations v WHERE %s))" % (EDGE_GROUP, _SAME_KEY),
    ),
    # 3: the heartbeat's inline bypass state and feed lag against the publisher.
    (
        "ALTER TABLE fleet.edges ADD COLUMN bypass text,"  # on, off, partial or unknown
        " ADD COLUMN publisher_serial bigint, ADD COLUMN publisher_checksum text,"  # the last heard of
        " ADD COLUMN feed_serials_behind bigint, ADD COLUMN feed_seconds_behind double precision",
    ),
    # 4: the customer map at the centre (`icpgate fleet customers import`), so the fleet's dashboard
    # names the customers whose addresses carry violations; the most specific range wins.
    (
        """CREATE TABLE fleet.customers (
            network cidr PRIMARY KEY,
            name text NOT NULL,
            contract text NOT NULL DEFAULT ''
        )""",
        "CREATE INDEX customers_network ON fleet.customers USING gist (network inet_ops)",
        """CREATE FUNCTION fleet.customer_of(address text) RETURNS fleet.customers
        LANGUAGE sql STABLE SET search_path = pg_catalog AS $$
            SELECT c FROM fleet.customers c
            WHERE c.network >>= (CASE WHEN address ~ '^[0-9A-Fa-f:.]+$' THEN address::inet END)
            ORDER BY masklen(c.network) DESC LIMIT 1
        $$""",
        "GRANT SELECT ON fleet.customers TO %s" % READER_GROUP,
        "GRANT INSERT, DELETE ON fleet.customers TO %s" % OPERATOR_GROUP,  # the NOC keeps the map
    ),
    # 5: site inspection's results, shipped by the edge that runs it (fleet/inspection.py): a copy
    # of its history (inspection/store.py) per edge, and its last pass with the shipping mark. The
    # rows of passes before the last complete one are what the edge forgot: readers skip them and
    # `fleet maintain` removes them (an edge deletes nothing).
    (
        """CREATE TABLE fleet.inspection_filings (
            edge_uuid uuid NOT NULL REFERENCES fleet.edges,
            role name NOT NULL DEFAULT current_user,
            licence text NOT NULL, site_name text NOT NULL, subject_name text NOT NULL,
            access text NOT NULL,                 -- our access record's status: active or first_review
            first_inspected timestamptz NOT NULL,
            pass bigint NOT NULL,                 -- the edge's pass that last inspected it
            PRIMARY KEY (edge_uuid, licence)
        )""",
        """CREATE TABLE fleet.inspection_domains (
            edge_uuid uuid NOT NULL REFERENCES fleet.edges,
            role name NOT NULL DEFAULT current_user,
            domain text NOT NULL, licence text NOT NULL,
            class text NOT NULL,                  -- hosted, indirect, elsewhere, unresolved or error
            detail text NOT NULL, addresses jsonb NOT NULL DEFAULT '[]',
            checked_at timestamptz NOT NULL,
            last_live timestamptz,                -- last seen hosted or indirect
            pass bigint NOT NULL,
            PRIMARY KEY (edge_uuid, domain)
        )""",
        "CREATE INDEX inspection_domains_licence ON fleet.inspection_domains (edge_uuid, licence)",
        """CREATE TABLE fleet.inspection_seen (
            edge_uuid uuid NOT NULL REFERENCES fleet.edges,
            role name NOT NULL DEFAULT current_user,
            domain text NOT NULL, class text NOT NULL,
            first_seen timestamptz NOT NULL, last_seen timestamptz NOT NULL,
            PRIMARY KEY (edge_uuid, domain, class)
        )""",
        """CREATE TABLE fleet.inspection_passes (
            edge_uuid uuid PRIMARY KEY REFERENCES fleet.edges,
            role name NOT NULL DEFAULT current_user,
            pass bigint,                          -- the edge's last pass, as shipped
            started timestamptz, finished timestamptz, state text, filings bigint, domains bigint, queries bigint,
            last_complete timestamptz,            -- when its last complete pass finished
            done_pass bigint,                     -- that pass: rows of older passes are forgotten
            grace_period double precision, hollow_alert_share double precision,  -- the edge's settings
            mark_pass bigint NOT NULL DEFAULT 0,  -- every filing written up to (mark_pass, mark_licence) is here
            mark_licence text NOT NULL DEFAULT '',
            shipped_at timestamptz
        )""",
        "GRANT SELECT, INSERT, UPDATE ON fleet.inspection_filings, fleet.inspection_domains, fleet.inspection_seen,"
        " fleet.inspection_passes TO %s" % EDGE_GROUP,
        "GRANT SELECT ON fleet.inspection_filings, fleet.inspection_domains, fleet.inspection_seen,"
        " fleet.inspection_passes TO %s" % READER_GROUP,
        *("ALTER TABLE fleet.%s ENABLE ROW LEVEL SECURITY" % table for table in _INSPECTION_TABLES),
        *("CREATE POLICY own_rows ON fleet.%s TO %s USING (%s) WITH CHECK (%s)" % (table, EDGE_GROUP, _OWN_ROWS,
          _OWN_EDGE) for table in _INSPECTION_TABLES),
        *("CREATE POLICY read_all ON fleet.%s FOR SELECT TO %s USING (true)" % (table, READER_GROUP)
          for table in _INSPECTION_TABLES),
    ),
)  # fmt: skip

VERSION_TABLE = """CREATE TABLE IF NOT EXISTS fleet.schema_version (
    version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"""


def roles_sql(edges: list[str], database: str = "icpgate") -> str:
    """What a superuser runs once before `fleet migrate`, and once per new edge: the owner that
    migrates, the group roles the grants name, a login role per edge and one for readers."""
    lines = [
        "-- Run as a superuser. Replace each CHANGE-ME with a password of its own (or use certificates).",
        "CREATE ROLE %s LOGIN PASSWORD 'CHANGE-ME';  -- icpgate fleet migrate|maintain" % OWNER,
        "CREATE ROLE %s NOLOGIN;  -- every edge's role is a member" % EDGE_GROUP,
        "CREATE ROLE %s NOLOGIN;  -- dashboards, fleet status|violations|serve" % READER_GROUP,
        "CREATE DATABASE %s OWNER %s;  -- skip if it exists; then: ALTER DATABASE %s OWNER TO %s;"
        % (database, OWNER, database, OWNER),
        "CREATE ROLE %s NOLOGIN IN ROLE %s;  -- readers who handle records centrally" % (OPERATOR_GROUP, READER_GROUP),
        "CREATE ROLE icpgate_read LOGIN PASSWORD 'CHANGE-ME' IN ROLE %s;" % READER_GROUP,
        "CREATE ROLE icpgate_noc LOGIN PASSWORD 'CHANGE-ME' IN ROLE %s;  -- one per operator: the audit names it"
        % OPERATOR_GROUP,
    ]
    for edge in edges:
        lines.append("CREATE ROLE %s LOGIN PASSWORD 'CHANGE-ME' IN ROLE %s;" % (edge_role(edge), EDGE_GROUP))
    lines.append("-- An edge is stopped alone with: REVOKE %s FROM <its role>; (or ALTER ROLE <its role> NOLOGIN)"
                 % EDGE_GROUP)  # fmt: skip
    return "\n".join(lines) + "\n"


def edge_role(edge_id: str) -> str:
    """The role name `roles_sql` suggests for an edge label: icpgate_edge_<label>, SQL-safe."""
    safe = "".join(char if char.isalnum() else "_" for char in edge_id.lower())
    return "%s_%s" % (EDGE_GROUP, safe)[:63]
