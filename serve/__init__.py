"""Ray Serve application for BLSP speech chat (see serve/app.py)."""
