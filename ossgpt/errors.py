"""The error the CLI and server report to the user as one line, never as a traceback:
bad input (a file, a tensor, a field), not a bug."""


class OssgptError(Exception):
    pass
