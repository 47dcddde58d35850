"""Durable instance store and the provenance database (SQLite by default, PostgreSQL by URL)."""
