"""RahatBack scheduler."""
