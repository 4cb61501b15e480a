"""Clients surviving node kills, Redis outages and storms, end to end (real processes, Chromium)."""
