# Copyright (c) mmtune contributors. All rights reserved.
__version__ = '0.1.0'


def _parse_version_info(version: str) -> tuple:
    """Turn ``'0.1.0'`` into ``(0, 1, 0)``."""
    return tuple(int(x) if x.isdigit() else x for x in version.split('.'))


version_info = _parse_version_info(__version__)
