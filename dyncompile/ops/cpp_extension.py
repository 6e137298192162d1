"""C++ CPU kernels built on first use with ``torch.utils.cpp_extension.load_inline``.

Each op's ``cpu.py`` declares one ``InlineExtension``; the build happens once
per process (cached on disk after the first time), and if no compiler is
available a warning is logged once and ``load()`` returns None so the op takes
its torch path.
"""

from __future__ import annotations

import logging
import os
import threading
from types import ModuleType

log = logging.getLogger("dyncompile")


class InlineExtension:
    """A lazily built C++ extension: ``load()`` gives the module or None."""

    def __init__(self, name: str, source: str, functions: list[str],
                 cflags: tuple[str, ...] = ("-O3", "-march=native")) -> None:
        self.name, self.source, self.functions, self.cflags = name, source, functions, cflags
        self._lock = threading.Lock()
        self._module: ModuleType | None = None
        self._failed = False

    def load(self) -> ModuleType | None:
        if self._module is not None or self._failed:
            return self._module
        with self._lock:
            if self._module is None and not self._failed:
                try:
                    from torch.utils.cpp_extension import load_inline

                    os.environ.setdefault("MAX_JOBS", "2")
                    self._module = load_inline(
                        name=self.name, cpp_sources=[self.source], functions=self.functions,
                        extra_cflags=list(self.cflags), verbose=False)
                except Exception as e:  # noqa: BLE001  (no compiler: the op's torch path)
                    log.warning("dyncompile: C++ kernel %s unavailable (%s); using the torch "
                                "path", self.name, e)
                    self._failed = True
        return self._module

    def available(self) -> bool:
        return self.load() is not None
