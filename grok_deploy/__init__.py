"""grok-deploy: Grok-1 from released weights to a verified, served model."""

__version__ = "0.1.0"
