import pytest

from ranks import RankGroup

_groups = {}


def get_group(size, **kwargs):
    """A live RankGroup of `size` ranks with these settings, restarted if a test broke it."""
    key = (size, tuple(sorted((k, str(v)) for k, v in kwargs.items())))
    g = _groups.get(key)
    if g is not None and g.broken:
        g.close()
        g = None
    if g is None:
        g = _groups[key] = RankGroup(size, **kwargs)
    return g


@pytest.fixture(scope="session")
def groups():
    yield get_group
    for g in _groups.values():
        g.close()
    _groups.clear()
