"""The database: engines and sessions, the models, units of work and the event outbox."""
