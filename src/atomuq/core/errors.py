"""Exceptions a user can act on."""


class AtomuqError(Exception):
    """Base class of every error atomuq raises on purpose."""


class InputError(AtomuqError):
    """A structure or file that cannot be used; the message names the file and structure."""


class ModelFileError(AtomuqError):
    """A model file that is missing, corrupt or inconsistent; the message names the file."""


class ModelError(AtomuqError):
    """A model that cannot give what was asked of it (e.g. derivatives of an energy outside autograd); names the model."""


class MemoryShortage(InputError):
    """A structure too large for the memory at hand; the message says how much it needs and what to do."""


class BlownUp(AtomuqError):
    """Positions that became NaN or infinite during a simulation: the integrator blew up (forces too large for the step)."""
