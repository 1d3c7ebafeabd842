"""saelab: app layer (see DESIGN.md)."""
