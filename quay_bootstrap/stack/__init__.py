"""conf/stack: planned from a listing, fetched, validated, and switched in atomically."""
