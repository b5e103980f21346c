"""The one kind of error the tools report to the user as a single line, `error: <message>`, and exit 1.

Raised for anything the user can fix: a setting, a data file, a checkpoint, a run that went non-finite.
The message names the culprit and what to do instead. Every other exception is a bug and keeps its
traceback.
"""
import argparse
import sys


class UserError(Exception):
    """A problem the user can fix, told in one line (the command-line tools print it and exit 1)."""


class ConfigError(UserError):
    """A setting that cannot work; the message names the key, its value and what to write instead."""


class DataError(UserError):
    """A dataset, prompt or eval file that is missing or damaged; the message names the file and the command
    that makes a good one."""


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable or from another program; the message names the file."""


class NumericsError(UserError):
    """A non-finite loss or gradient during training (nonfinite='stop')."""


class OneLineErrors(argparse.ArgumentParser):
    """An argparse parser whose bad options are one line, `error: ...`, like every other error of the tools."""

    def error(self, message):
        sys.exit(f"error: {message} (--help for the options)")


def need(ok, message):
    """The check of a setting: ConfigError(message) unless ok."""
    if not ok:
        raise ConfigError(message)
