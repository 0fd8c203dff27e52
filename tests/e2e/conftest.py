"""End-to-end tests share the `cli` fixture of tests/conftest.py."""
