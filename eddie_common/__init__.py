"""Pieces shared by the three programs: errors, tokens, logging, serving, flags."""
