"""The customer map at the centre: `icpgate fleet customers import FILE` loads the same file as
`icpgate customers import` does on an edge (violations/customers.py) into `fleet.customers`, so the
fleet's Grafana dashboard can name the customer whose range holds a violation's address."""

from __future__ import annotations

import psycopg

from ..violations.customers import Customer


def replace_customers(connection: psycopg.Connection, customers: list[Customer]) -> None:
    """The new map in place of the old, in one transaction: readers see one or the other. Needs a
    member of icpgate_operator."""
    with connection.transaction(), connection.cursor() as cursor:
        cursor.execute("DELETE FROM fleet.customers")
        rows = [(customer.network, customer.name, customer.contract) for customer in customers]
        cursor.executemany("INSERT INTO fleet.customers (network, name, contract) VALUES (%s, %s, %s)", rows)


def customer_count(connection: psycopg.Connection) -> tuple[int, int]:
    """(ranges, customers) in the centre's map."""
    return connection.execute("SELECT count(*), count(DISTINCT name) FROM fleet.customers").fetchone()
