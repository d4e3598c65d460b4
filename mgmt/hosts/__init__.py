"""Hosts: registration at start-up, pings, power reports and the sweep of silent hosts."""
