"""Helpers shared by the test suites (real servers started as subprocesses)."""
