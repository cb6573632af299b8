"""The Redis consumer around the engine: intake, in-flight table, leases, finishing jobs, the tick loop."""
