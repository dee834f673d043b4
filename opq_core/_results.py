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


def table_repr(name: str, head: str, items, row, *footer: str) -> str:
    """``Name(``, the ``head`` line, ``row(item)`` per item, the ``footer`` lines, ``)``."""
    return f"{name}(\n" + "\n".join([head, *(row(x) for x in items), *footer]) + "\n)"


def clip(s: str, n: int) -> str:
    """``s`` cut to its last ``n`` characters (an ellipsis first) when longer."""
    return s if len(s) <= n else "…" + s[-(n - 1):]


def shape_text(shape, n: int) -> str:
    """``3x3x64`` clipped to ``n`` characters."""
    return clip("x".join(str(s) for s in shape), n)


def layer_table(layers, head, row, total_row, footer, max_rows=None) -> str:
    """A plain-text table of named layers: ``head(nw)``, a rule, ``row(layer, nw)`` for the
    first ``max_rows`` layers, a rule, ``total_row(nw)``, then the ``footer`` lines;
    ``nw`` is the width of the longest name (at least 28): names are never cut."""
    nw = max([28] + [len(r.name) for r in layers])
    h = head(nw)
    rows = [h, "-" * len(h)]
    shown = layers if max_rows is None else layers[:max_rows]
    rows.extend(row(r, nw) for r in shown)
    if max_rows is not None and len(layers) > max_rows:
        rows.append(f"... {len(layers) - max_rows} more layers")
    rows.append("-" * len(h))
    rows.append(total_row(nw))
    rows.extend(footer)
    return "\n".join(rows)
