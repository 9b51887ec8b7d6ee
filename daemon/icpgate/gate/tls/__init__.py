"""TLS on the gate: the ClientHello parser, the handshake watcher (HelloRetryRequest, records), the
per-connection handler that decides on the SNI, and the TLS block page. Imports only within the gate
and below it.
"""
