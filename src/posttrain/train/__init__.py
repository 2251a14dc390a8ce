"""Shared training mechanics: optimizer and schedule, metrics, progress, seeding."""
