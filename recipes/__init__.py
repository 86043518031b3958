"""Data, not code: how each library spreads a drop-path rate over depth (read by pathsurgeon.plan)."""
