"""planner: which tasks fuse and how they are laid out on the cluster (OR-Tools CP-SAT + the simulator).
Entry point: `muxtune.planner.plan.plan(tasks, cluster, cost_model, objective=..., time_limit=...)`."""
