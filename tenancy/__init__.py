"""Workspaces and everything they own: numbers, agents, credentials, keys."""
