"""The coordinator tests' fixtures (`env`, `url`, `sqlite_url`), for every saga test module."""

from .test_coordinator import env, sqlite_url, url  # noqa: F401
