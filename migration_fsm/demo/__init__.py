"""`migration-fsm demo`: a whole migration under live traffic, on SQLite files."""
