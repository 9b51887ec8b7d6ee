"""icpgate: enforce ICP filing (ICP备案) for the hosted IPs of a data centre or cloud.

The packages, top-down (each imports only from those below it; docs/architecture.md has the map):
cli -> process -> admin -> feed | inline | reports -> gate -> violations -> policy -> registry
-> config | names | telemetry.
"""

__version__ = "0.2.0.dev0"  # docs/changelog.md: 0.1.0 is commit 78e0bab; this is what follows it
