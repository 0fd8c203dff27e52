"""Offline training from saved runs, evaluation and export."""
