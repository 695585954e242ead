# Copyright (c) mmtune contributors. All rights reserved.
"""Plain-Python helpers that several layers share (imports nothing of
mmtune, torch or mmengine)."""

from typing import Any, Mapping, Optional

__all__ = ['options_switch']


def options_switch(value: Any, key: str, expected: str) -> Optional[dict]:
    """Read a config key that is a switch or a dict of options.

    Args:
        value: The key's value: None or False (off), True (on, with the
            defaults) or a mapping of options.
        key (str): The key's name, for the error.
        expected (str): What a mapping holds, for the error, e.g.
            ``'dict(num_samples=8192, interval=1)'``.

    Returns:
        dict, optional: None when off, else the options (``{}`` for True).

    Raises:
        TypeError: ``value`` is none of these.
    """
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(
            f'`{key}` must be a dict like {expected}, True, False or None, '
            f'but got {value!r} of type {type(value).__name__}'
        )
    return dict(value)
