"""When an index run asks an image URL's server again about an image it already embedded."""

from __future__ import annotations

# After each check an image URL waits settings.remote_recheck times 1 to
# 1 + RECHECK_SPREAD (drawn per check) before it is asked again.
RECHECK_SPREAD = 1.0
_MASK64 = (1 << 64) - 1


def url_check_due(image_id: int, checked_at: int | None, *, now: float, max_age: float) -> bool:
    """Whether an indexed image URL must be asked again (a conditional GET) in this run.

    Shop CDNs version image URLs, so a changed image comes under a new URL (a new
    image row, always fetched); re-checking only bounds how late a change kept under
    the same URL is seen. After each check an image waits between ``max_age`` and
    ``(1 + RECHECK_SPREAD) * max_age``, a fraction drawn from its id and that check's
    time: URLs all fetched by one first import come due over a week of nights, and
    later waves blur into an even share per night instead of recurring in lockstep.

    Args:
        image_id: the image's id.
        checked_at: when it was last fetched or answered 304 (epoch seconds); None:
            never recorded (indexed before the column existed).
        now: the current time (epoch seconds).
        max_age: ``settings.remote_recheck`` (0 with ``--recheck-urls``), seconds.

    Returns:
        True when it was never checked, ``max_age`` is 0, its wait is over, or the check
        lies in the future (a clock set back: not trusted).
    """
    if checked_at is None or max_age <= 0:
        return True
    wait = max_age * (1 + RECHECK_SPREAD * _wait_fraction(image_id, checked_at))
    return not 0 <= now - checked_at < wait


def _wait_fraction(image_id: int, checked_at: int) -> float:
    """A pseudo-random fraction in [0, 1), fixed by (image, check time): splitmix64's mixer."""
    x = (image_id * 0x9E3779B97F4A7C15 + checked_at) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) / 2**64
