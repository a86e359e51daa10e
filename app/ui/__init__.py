"""The web dashboard (/ui): server-rendered pages over the key service and the ledger readers."""
