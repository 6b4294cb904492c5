"""Domain errors, mapped once to gRPC status codes (see avatar.grpc_util)."""


class AvatarError(Exception):
    """Base class of errors the mesh reports to clients with a reason."""


class InvalidInput(AvatarError, ValueError):
    """The request cannot be served as given (bad file, bad size string...): INVALID_ARGUMENT."""


class ResourceExhausted(AvatarError):
    """Not enough memory or capacity for the job now: RESOURCE_EXHAUSTED, with what to lower."""


class Unavailable(AvatarError):
    """The service cannot serve now but may later (no live replica of a role; a multi-GPU group lost a
    rank and restarts): UNAVAILABLE, retry later."""


class WeightsError(AvatarError):
    """A checkpoint is missing, incomplete or does not match the architecture: FAILED_PRECONDITION."""
