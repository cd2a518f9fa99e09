"""profiler: measures what one multiplexed training step costs on this device (profile.py -> a Profile
table, CSV, cached by device fingerprint) and turns it into the CostModel every other part uses
(cost_model.py; an analytic roofline over hardware.csv for GPUs we do not have). See docs/profiler.md."""
