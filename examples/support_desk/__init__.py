"""Support desk: an agent that looks up orders and applies the standard operating procedure."""
