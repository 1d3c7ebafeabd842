"""``saelab bench …`` commands (registered on import)."""
