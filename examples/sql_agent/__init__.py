"""SQL agent: an HTTP-served agent that answers questions about a small shop database with SQL."""
