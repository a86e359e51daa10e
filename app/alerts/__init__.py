"""Budget alerts (SPEC 8, 12): thresholds, a soft budget crossed, a budget exhausted, overruns;
each once per period (overruns once per request), POSTed as JSON or Slack messages, signed."""
