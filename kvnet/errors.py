"""The one exception hierarchy: every error kvnet raises on purpose is a `KvnetError`.

Callers (the CLI, the daemon, an agent) catch `KvnetError` to turn any expected failure into one
clear line; anything else is a bug. Each layer subclasses the root in its own module (ManifestError
in manifest, StoreError in store, ...); the classes here are the ones that belong to no single layer.
"""

from __future__ import annotations


class KvnetError(Exception):
    """Root of every error kvnet raises deliberately."""


class InputError(KvnetError, ValueError):
    """Something the user handed in is unusable: a file that is not UTF-8 text, a bad size or count."""


class NetworkError(KvnetError):
    """A network operation could not be done (no peer reachable, cannot listen, ...)."""


class BootstrapError(NetworkError, ValueError):
    """A bootstrap address is malformed, or no bootstrap peer could be reached."""


class ListenError(NetworkError):
    """The node cannot listen where it was told to (the address is in use or not local)."""


def first_kvnet_error(exc: BaseException) -> KvnetError | None:
    """The first `KvnetError` in an exception or any (nested) exception group, depth first.

    trio nurseries wrap failures in (nested) ExceptionGroups; a deliberate error must still reach
    the user as its own one line. None means the failure is a bug, not a KvnetError.
    """
    if isinstance(exc, KvnetError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = first_kvnet_error(inner)
            if found is not None:
                return found
    return None
