"""State that must agree across replicas: adapter registrations and the active index."""
