"""Statistics on the subjects x elements matrix: linear models (ModelArray.lm)."""
