"""Budget alerts (SPEC 8): a soft budget crossed, a budget exhausted; once per period."""
