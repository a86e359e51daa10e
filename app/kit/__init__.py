"""Helpers every domain shares: money display, time parsing and formatting, page cursors.

Nothing here imports the rest of `app`, so any room may use it."""
