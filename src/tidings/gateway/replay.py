"""Reading the log newest first: the last messages of a pattern below a position.

Engines read forwards only (`read(pattern, after, stop, limit)`, oldest
first). The newest `limit` messages below a position are found by reading
windows of positions backwards from it: a window holding more than still
needed is narrowed towards its top (positions are unique, so a window no
wider than what is needed always fits), one that holds fewer is taken whole
and the next, wider, window is read below it. Every read asks for at most
`limit + 1` messages, so a page costs a few small reads however long or
sparse the log is.
"""

from __future__ import annotations

from ..engines.base import Engine
from ..messages import Message

__all__ = ["newest"]

#: How much wider the next window below gets when a window held fewer than needed.
GROW = 4


async def newest(engine: Engine, pattern: str, after: int, upto: int, limit: int
                 ) -> tuple[list[Message], bool]:
    """Up to `limit` messages matching `pattern` with `after < position <= upto`, newest
    first, and whether older ones remain in that range."""
    out: list[Message] = []
    top, span = upto, max(limit, 16)
    while top > after and len(out) < limit:
        need = limit - len(out)
        bottom = max(after, top - span)
        got = await engine.read(pattern, bottom, top, need + 1)
        if len(got) > need:  # more here than needed: look at a narrower top part
            span = max(need, (top - bottom) // GROW)
            continue
        out.extend(reversed(got))
        top, span = bottom, span * GROW
    if top <= after:
        return out, False
    # the page is full: is anything older left in the range?
    return out, bool(await engine.read(pattern, after, top, 1))
