"""The violation log as the workers record it: the SQLite store, its batched writer, the customer map.

Below the gate (the workers write to it). Imports only names and the standard library; reports,
exports and DNS confirmation live in `reports/`.
"""
