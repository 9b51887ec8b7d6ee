"""Inline operations: the nftables bypass of the hosted ranges and the watcher that switches it.

Control plane, run as its own unit with CAP_NET_ADMIN only. May import policy and config; the gate
never imports it.
"""
