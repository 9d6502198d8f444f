"""RahatBack notifier: turns domain events into emails, webhooks and Slack messages."""

__version__ = "0.1.0"
