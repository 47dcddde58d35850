"""The DICOM edge of the view-synthesis node: SCP, SCU, rules, scheduler and the command line.

Importing this package never imports torch: the engine lives in :mod:`synthesis` and is loaded
lazily by the worker that runs it.
"""

__version__ = "0.1.0"
