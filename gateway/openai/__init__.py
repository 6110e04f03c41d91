"""The OpenAI-compatible HTTP edge (PROTOCOL.md, "OpenAI-compatible HTTP edge"): `edge` serves
it, `outlets` turns relayed log frames into its events; the wire format is `protocol.openai`."""
