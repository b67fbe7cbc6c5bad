"""The cold tier: PostgreSQL tables, the writer and the queries."""
