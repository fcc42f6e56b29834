"""Persistence: tables, sessions, one query module per aggregate.

Imports neither api nor workers.
"""
