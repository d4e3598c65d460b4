"""PCI devices in the database: claims and releases, and reconciling an agent's inventory."""
