"""shopfleet."""
