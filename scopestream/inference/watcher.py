"""`RegistryWatcher`: newer versions of a running model, loaded and swapped in the background."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

    from scopestream.inference.engine import InferenceEngine
    from scopestream.inference.package import Registry
    from scopestream.inference.predictor import Predictor


class RegistryWatcher:
    """Polls the registry; loads, compiles and swaps in newer versions in the background."""

    def __init__(
        self,
        registry: Registry,
        name: str,
        engine: InferenceEngine,
        make_predictor: Callable[[Any], Predictor],
        *,
        interval_s: float = 2.0,
        on_swap: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.registry = registry
        self.name = name
        self.engine = engine
        self.make_predictor = make_predictor
        self.interval_s = interval_s
        self.on_swap = on_swap
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"watch-{name}", daemon=True)

    def start(self) -> None:
        """Start polling."""
        self._thread.start()

    def stop(self) -> None:
        """Stop polling."""
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        current = self.engine.predictor.package.version
        while not self._stop.wait(self.interval_s):
            latest = self.registry.latest_version(self.name)
            if latest is None or latest <= current:
                continue
            try:
                pkg = self.registry.resolve(f"{self.name}@{latest}")
                predictor = self.make_predictor(pkg)  # loads and compiles, off the hot path
                self.engine.swap(predictor)
                current = latest
                if self.on_swap is not None:
                    self.on_swap(pkg.identity)
            except Exception as e:  # a bad new version must not stop the running one
                self.errors.append(f"{self.name}@{latest}: {e}")
                current = latest
