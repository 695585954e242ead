# Copyright (c) mmtune contributors. All rights reserved.
"""Install mmtune.

The version lives in ``mmtune/version.py`` only; the dependencies are read
from ``requirements/``.
"""

import os.path as osp
import re

from setuptools import find_packages, setup

HERE = osp.dirname(osp.abspath(__file__))


def get_version() -> str:
    with open(osp.join(HERE, 'mmtune', 'version.py')) as f:
        match = re.search(r"^__version__ = '([^']+)'", f.read(), re.M)
    if match is None:
        raise RuntimeError('no __version__ in mmtune/version.py')
    return match.group(1)


def parse_requirements(fname: str) -> list:
    """Read one requirements file, skipping comments and ``-r`` lines."""
    reqs = []
    with open(osp.join(HERE, 'requirements', fname)) as f:
        for line in f:
            line = line.split('#', 1)[0].strip()
            if line and not line.startswith('-'):
                reqs.append(line)
    return reqs


def readme() -> str:
    with open(osp.join(HERE, 'README.md'), encoding='utf-8') as f:
        return f.read()


setup(
    name='mmtune',
    version=get_version(),
    description='Tune mode for Conv+BN and precise BN for OpenMMLab '
    'fine-tuning',
    long_description=readme(),
    long_description_content_type='text/markdown',
    keywords='computer vision, fine-tuning, batch normalization, openmmlab',
    packages=find_packages(exclude=('configs', 'tools', 'tests', 'docs')),
    include_package_data=True,
    python_requires='>=3.8',
    license='Apache License 2.0',
    install_requires=parse_requirements('runtime.txt'),
    extras_require={
        'all': parse_requirements('mminstall.txt')
        + parse_requirements('tests.txt'),
        'mim': parse_requirements('mminstall.txt'),
        'tests': parse_requirements('tests.txt'),
    },
    zip_safe=False,
)
