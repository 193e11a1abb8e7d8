"""Plumbing every service uses the same way: broker, store, telemetry, logging, HTTP, DLQ."""
