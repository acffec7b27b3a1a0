"""Where results go: Arrow-encoded embeddings and dead letters."""
