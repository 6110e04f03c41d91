"""Programs that talk to a running tokenrelay: the terminal chat client and the operator's
monitor. They use the wire contract (`protocol`) and, for the monitor, the Redis key names
(`store.keys`); they import nothing from `gateway` or `worker`."""
