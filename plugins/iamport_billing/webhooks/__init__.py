"""Gateway webhooks: hints that make the ledger settle one charge by lookup, in seconds."""
