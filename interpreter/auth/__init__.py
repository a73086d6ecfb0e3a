"""Authentication: who is calling, as a Principal that owns data (DESIGN §9)."""
