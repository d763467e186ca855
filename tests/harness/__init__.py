"""Test harness of chatd: starts and stops the real stack (see stack.py)."""
