"""The equal-quality harness (issue 15): see README.md here. Not collected by pytest (no test_*.py files)."""
