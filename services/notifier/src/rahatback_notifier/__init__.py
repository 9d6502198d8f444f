"""RahatBack notifier."""
