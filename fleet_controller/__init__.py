"""fleet_controller."""
