"""Fixture code shared by the integration and end-to-end tests."""
