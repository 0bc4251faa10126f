"""A stream's token ids as the server keeps them, counting the walks over all of them (the
plugin tests of tool and reasoning parsers: a view, not a copy, each delta)."""


class CountedIds(list):
    """One list, extended in place; ``walks``: the times something iterated over all of it."""

    def __init__(self, *args):
        super().__init__(*args)
        self.walks = 0

    def __iter__(self):
        self.walks += 1
        return super().__iter__()
