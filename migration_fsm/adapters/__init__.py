"""Adapters for real task queues (DESIGN.md section 10): for each supported system, a
`TaskStore` over the system's own storage and the integration of `WorkerGate` into its
worker. Each is an optional extra (`pip install migration-fsm[procrastinate]`) and is
imported only by name (`migration_fsm.adapters.procrastinate`); docs/ADAPTERS.md shows the
lines a team adds to its producer, its worker and its config.
"""
