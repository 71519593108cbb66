"""tracker: self-hosted email open and click analytics."""

__version__ = "0.1.0"
