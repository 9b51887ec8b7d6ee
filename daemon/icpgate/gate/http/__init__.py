"""Plain HTTP on the gate: request framing and checks (the inspector), response framing, and the
per-connection handler that re-decides every request. Imports only within the gate and below it.
"""
