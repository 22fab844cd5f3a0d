"""Messaging: outbound SMS through one compliance gate, webhooks, conversations, consent and agent work."""
