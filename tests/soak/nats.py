"""A NATS node SIGKILLed under load. There is no NATS engine yet: the row says so.

When there is one, this is the one function to write: start a throwaway `nats-server`
(port 0, JetStream on a temp dir), publish, append and consume through it as the other
rows do, SIGKILL the node `kills` times at points drawn from `rng`, restart it, and check
with the same checkers (`publish.check_singles`, `events.check_streams`, ...).
"""

from __future__ import annotations

import random
from pathlib import Path

from .matrix import RowResult, Target


def run(kills: int, rng: random.Random, workdir: Path, target: Target) -> RowResult:
    return RowResult("nats-kill", skipped="n/a: no NATS engine yet")
