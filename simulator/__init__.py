"""SimPy simulator: the step timeline of a Plan (iteration.py) and tenant arrivals on a cluster
(cluster.py); both price work only through a CostModel. See docs/simulator.md."""
