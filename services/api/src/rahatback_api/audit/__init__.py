"""Who did what, when and from where: one row per mutating request, login and enrollment."""
