"""lorafleet services."""
