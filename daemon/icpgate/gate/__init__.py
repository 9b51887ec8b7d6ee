"""The hot path: one asyncio protocol per connection (HTTP, TLS, auto-detected) and per QUIC flow, that
reads the Host or SNI, asks the policy, then relays or blocks. `http/`, `tls/` and `quic/` hold each
protocol's parsers and handler; the shared parts (upstream, block answers, sniffing) sit here.

May import violations' recording side, policy, registry's index, config, names and telemetry; never
admin, feed, reports, inline or process.
"""
