"""The one exception hierarchy of pyccl.

Every message names the op, the rank, the peer and what was expected, so a user
reading one line of one rank's log knows where to look.
"""


class PycclError(RuntimeError):
    """Base of every error pyccl raises on purpose."""


class InvalidArgument(PycclError, ValueError):
    """Bad input, found before any byte moves (dtype, size, layout, root, device)."""


class Timeout(PycclError, TimeoutError):
    """A wait ran past the communicator's timeout; the message says what was awaited."""


class PeerFailure(PycclError):
    """A peer died, closed its end, or reported an error of its own."""


class TransportError(PycclError):
    """A transport could not set up or move bytes (socket, shared memory, verbs, CUDA)."""
