"""Stopping a long engine loop from its progress callback without losing resumable work.

A capture, a training run or an analysis calls back after every batch; an exception raised
there ends it. Normally the loop then removes its partial output (nothing to resume from),
but an ``Interrupted`` one is left in place: the caller will resume it, or another process
now owns it (a job the reaper handed to a new worker writes into the same directory).
"""

from __future__ import annotations


class Interrupted(Exception):
    """Raised by a progress callback: stop now and leave the partial output as it is."""
