"""Models from the papers, built from moekit's layers (kept apart from the library core)."""
