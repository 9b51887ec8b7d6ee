"""The daemon's configuration: the `[...]` tables and their validation (settings), the TOML schema
helpers that name file, line and field, and time display. A leaf: imports nothing from icpgate.
"""
