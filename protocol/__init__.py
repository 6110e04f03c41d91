"""tokenrelay's wire formats and pure logic (no I/O): the single source of truth for PROTOCOL.md."""
