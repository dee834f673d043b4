"""Shared pieces of the frozen result objects: totals and columns over their rows, and the
multi-line table ``repr``."""
from __future__ import annotations


def total(field: str, kind=None, over: str = "layers", doc: str | None = None) -> property:
    """A read-only property: ``sum(row.<field> for row in self.<over>)``, passed through
    ``kind`` (e.g. ``float``) when given."""
    def get(self):
        s = sum(getattr(r, field) for r in getattr(self, over))
        return s if kind is None else kind(s)
    get.__name__ = field
    return property(get, doc=doc)


def column(field: str, over: str) -> property:
    """A read-only property: ``[row.<field> for row in self.<over>]``."""
    def get(self):
        return [getattr(r, field) for r in getattr(self, over)]
    get.__name__ = field
    return property(get)


def table_repr(name: str, rows) -> str:
    """``Name(``, one line per row, ``)``."""
    return f"{name}(\n" + "\n".join(rows) + "\n)"
