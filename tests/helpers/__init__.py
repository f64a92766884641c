"""Builders the test folders share (tiny models, recipes, small runs); imported as ``tests.helpers.*``."""
