"""The people of an organization and their roles."""
