"""Generated JSON Schemas of every message; regenerate with ``make schema``, never edit."""
