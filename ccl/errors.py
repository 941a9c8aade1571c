"""The one exception hierarchy of pyccl.

Every message names the op, the rank, the peer and what was expected, so a user
reading one line of one rank's log knows where to look.
"""


class PycclError(RuntimeError):
    """Base of every error pyccl raises on purpose."""


class InvalidArgument(PycclError, ValueError):
    """Bad input, found before any byte moves (dtype, size, layout, root, device)."""


class Timeout(PycclError, TimeoutError):
    """A wait ran past the communicator's timeout; the message says what was awaited.

    The message always carries the words " Timed out " (as Gloo's and NCCL's do): torch's own
    tests match timeouts with the regex " (Timed out|closed|timeout) ", and so do users' log
    searches. A message that lacks them gets " (pyccl Timed out waiting)" appended."""

    MARK = " Timed out "

    def __init__(self, *args):
        if args and isinstance(args[0], str) and self.MARK not in args[0]:
            args = (f"{args[0]} (pyccl Timed out waiting)",) + args[1:]
        super().__init__(*args)


class PeerFailure(PycclError):
    """A peer died, closed its end, or reported an error of its own."""


class TransportError(PycclError):
    """A transport could not set up or move bytes (socket, shared memory, verbs, CUDA)."""
