"""One exception hierarchy for the whole node.

Inside the node, failures are exceptions; they become DICOM status codes at the network edge,
job states in the scheduler, and exit codes in the command line.

Every error says whether trying again can help: ``permanent`` errors are deterministic (the same
input and settings fail the same way every time: an undecodable image, a value the writer cannot
encode, an input the model refuses) and end a job at once; every other failure -- engine crash,
out of memory, database busy, an input file that cannot be read right now -- is transient and
uses the job's retry budget. :func:`is_permanent` decides for any exception.
"""

from __future__ import annotations


class NodeError(Exception):
    """Base of every error the node raises on purpose."""

    #: True when the same input and settings fail the same way every time (never retried).
    permanent: bool = False


class ConfigError(NodeError):
    """The site configuration is invalid: the message names the key and what is wrong."""

    permanent = True


class StorageError(NodeError):
    """An instance or a record could not be written or read durably."""


class DicomInputError(NodeError):
    """A received or given dataset cannot be understood (missing or invalid attributes)."""

    permanent = True


class SynthesisError(NodeError):
    """The engine cannot synthesise from the given input (undecodable, too small, not a radiograph,
    invalid settings): deterministic. A model that cannot be loaded is :class:`ModelLoadError`."""

    permanent = True


class ModelLoadError(SynthesisError):
    """A model folder is missing, incomplete or corrupt: the message names the folder and piece.

    Not permanent for a job: the site can fix the folder, and the job then runs."""

    permanent = False


class InputRefused(NodeError):
    """The model cannot ground this input: outside its declared intended inputs, or its consistency
    score is below the model's threshold. Deterministic; the job ends ``refused``, nothing written.

    ``score`` and ``method`` are the consistency score when one was computed (None for a refusal
    on the header alone)."""

    permanent = True

    def __init__(self, reason: str, score: float | None = None, method: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.score = score
        self.method = method


class DeliveryError(NodeError):
    """A derived instance could not be delivered to a peer."""


class DeliveryRefused(DeliveryError):
    """The peer refused the whole request for a reason retrying will not change (bad credentials,
    an HTTP 4xx other than 408/429): the delivery fails at once, until an operator resends it."""


class RecallError(NodeError):
    """A recall cannot be made as asked: nothing matches, or an output cannot be read."""


def is_permanent(error: BaseException) -> bool:
    """True when retrying cannot help: a ``permanent`` node error. Anything else (engine crash,
    ``MemoryError``, CUDA out of memory, a database or file-system error) is transient."""
    return isinstance(error, NodeError) and error.permanent
