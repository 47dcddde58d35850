"""One exception hierarchy for the whole node.

Inside the node, failures are exceptions; they become DICOM status codes at the network edge,
job states in the scheduler, and exit codes in the command line.
"""


class NodeError(Exception):
    """Base of every error the node raises on purpose."""


class ConfigError(NodeError):
    """The site configuration is invalid: the message names the key and what is wrong."""


class StorageError(NodeError):
    """An instance or a record could not be written or read durably."""


class DicomInputError(NodeError):
    """A received or given dataset cannot be understood (missing or invalid attributes)."""


class SynthesisError(NodeError):
    """The engine cannot load a model or cannot synthesise from the given input."""


class ModelLoadError(SynthesisError):
    """A model folder is missing, incomplete or corrupt: the message names the folder and piece."""


class DeliveryError(NodeError):
    """A derived instance could not be delivered to a peer."""


class DeliveryRefused(DeliveryError):
    """The peer refused the whole request for a reason retrying will not change (bad credentials,
    an HTTP 4xx other than 408/429): the delivery fails at once, until an operator resends it."""
