"""icpgate: enforce ICP filing (ICP备案) for the hosted IPs of a data centre or cloud."""

__version__ = "0.1.0"
