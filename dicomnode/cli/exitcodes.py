"""Named exit codes of the ``dicomnode`` command (sysexits-style where one fits)."""

import enum


class ExitCode(enum.IntEnum):
    OK = 0
    FAILURE = 1  # the command ran but what it was asked to do failed
    USAGE = 2  # bad command line (argparse also exits 2)
    NOT_FOUND = 3  # the UID, job, peer or file named does not exist
    PEER_UNREACHABLE = 4  # association to a peer refused or timed out
    CONFIG = 78  # EX_CONFIG: the configuration file is invalid
    INTERRUPTED = 130
