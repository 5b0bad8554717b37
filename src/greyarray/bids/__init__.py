"""The BIDS-App: discovery, cohort tables, levels, derivatives."""
