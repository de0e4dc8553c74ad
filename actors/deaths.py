"""How an actor died, in our words: the signal or exit code when Ray's error names one, never
Ray's internals (actor id, process id, addresses)."""

from __future__ import annotations

import re

# Only a signal the error says the process got: Ray's boilerplate lists causes it merely suspects.
_SIGNAL = re.compile(r"(?:killed by|received|terminated by) (?:signal )?(SIG[A-Z]{2,}|\d+)")
_EXIT = re.compile(r"\bexit(?:ed with)? code (-?\d+)")


def death_cause(exc: BaseException | None) -> str:
    """Why an actor's process ended, from the error of a call that found it dead (None: a call
    found it restarted), for "<actor> died (<cause>)": ``killed by SIGKILL``, ``exited with code
    3``, the out-of-memory killer, or, when Ray's error names none (Ray 2.x reports a SIGKILL only
    as a closed connection), that it names none."""
    text = "" if exc is None else str(exc)
    if "OOM" in text or "memory pressure" in text:
        return "killed for lack of memory"
    if "ray.kill" in text:
        return "killed by ray.kill"
    if m := _SIGNAL.search(text):
        return f"killed by {m[1] if m[1].startswith('SIG') else 'signal ' + m[1]}"
    if m := _EXIT.search(text):
        return f"exited with code {m[1]}"
    return "its process ended; Ray reported no signal or exit code"
