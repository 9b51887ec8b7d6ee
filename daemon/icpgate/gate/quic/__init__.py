"""QUIC on the gate: Initial decryption and ClientHello reassembly, the flow table, the UDP sockets and
the listener that decides each flow and relays or drops it. Imports only within the gate and below it.
"""
