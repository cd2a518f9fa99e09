"""simulator: see the open issue that builds it (DESIGN.md); nothing here yet."""
