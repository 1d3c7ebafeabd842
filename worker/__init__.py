"""saelab: worker layer (see DESIGN.md)."""
