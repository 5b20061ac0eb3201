"""A tqdm progress bar behind the library's ``Progress`` protocol."""

from __future__ import annotations

from tqdm import tqdm


class TqdmProgress:
    """Shows images done, images/s and the time left on stderr."""

    def __init__(self, description: str = "indexing", disable: bool | None = None):
        # disable=None: tqdm hides itself when stderr is not a terminal (CI logs, pipes).
        self._bar = tqdm(desc=description, unit="img", dynamic_ncols=True, disable=disable)

    def set_total(self, total: int) -> None:
        self._bar.reset(total=total)

    def advance(self, count: int) -> None:
        self._bar.update(count)

    def close(self) -> None:
        self._bar.close()
