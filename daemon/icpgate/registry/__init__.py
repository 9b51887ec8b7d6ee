"""The filings: the SQLite registry (the source of truth), the shared LMDB index derived from it, the
filing model and licence numbers, the canonical interchange format, and `importers/` for the other
formats. May import config and names only.
"""
