"""Readers of the formats operators import: spreadsheets (CSV, XLSX), the national system's XML and its
look-ups, and the dispatcher that picks one by file. A new importer goes here. May import the
registry's model and below.
"""
