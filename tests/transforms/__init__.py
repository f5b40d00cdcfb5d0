"""Transforms the tests serve with ``--transform tests.transforms.<module>:<function>``."""
