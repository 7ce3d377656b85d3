"""Errors raised by the datasets package."""


class DatasetError(Exception):
    """A dataset could not be found, downloaded, verified or read. The message says why."""
