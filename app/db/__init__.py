"""PostgreSQL plumbing that the store (app/retrieval) and the fleet (app/fleet) share: one
pool per replica, URLs that never show their password, and versioned migrations."""
