"""The fleet: every edge's violation records and health in one central PostgreSQL (docs/fleet.md)."""
