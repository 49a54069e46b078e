"""A supervised fleet of rollout servers: `FleetEngine`, the `VLLMEngine` that `--rollout-url`
gives, watching its servers.

- Before each step's first request (the first `generate` after a `sync_weights`) every server is
  probed in parallel with a real one-token generation (`probe_timeout`), since vLLM's `/health`
  answers while a worker is dead or the engine is paused. A server that fails the probe, or fails
  a request during the step, is down: no request is sent to it and the weight sync skips it, so
  a hung server costs one timeout, not one per call. Each probe of a down server can bring it
  back; it then serves again only once it holds the current weights (the disk path reloads it at
  once, the in-memory path pushes to it at the next sync). In memory the probe also reads the
  server's weight version tag, so a server restarted between two probes (with its original
  weights) is not taken for one holding ours.
- A server this process launched (`launchers`: url -> a function that starts it again and
  returns once it is healthy) is restarted in the background when it goes down; it stays down
  meanwhile. Servers launched elsewhere (`--rollout-url`) are restarted by whoever started them
  (examples/rmt_slurm.sbatch runs each under a restart loop).
- Requests in flight on a failed server are retried on the others by the client; when none is
  left the step trains NTP-only (`rollout_failed`). `metrics()` adds the servers down at the
  step's probe and the restarts so far.

Time bound: a step waits on the service at most probe_timeout + rollout_timeout x (retries + 1)
plus the backoffs, and a server that was down at the probe is not contacted again that step.
"""

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from megatron_rmt.rollout.client import VLLMEngine, parse_completion
from megatron_rmt.rollout.weight_transfer import held_tag

log = logging.getLogger(__name__)


class FleetEngine(VLLMEngine):
    def __init__(
        self,
        urls: list[str],
        eos_id: int,
        *,
        probe_timeout: float = 5.0,
        launchers: dict[str, Callable[[], object]] | None = None,
        **kwargs,
    ):
        super().__init__(urls, eos_id, **kwargs)
        self.probe_timeout = min(probe_timeout, self.timeout)
        self.launchers = {u.rstrip("/"): f for u, f in (launchers or {}).items()}
        self.down: set[str] = set()
        self.restarts = 0
        self._probed = False
        self._probing = threading.Lock()
        self._restarting: dict[str, Future] = {}
        self._restarter = ThreadPoolExecutor(max(1, len(self.launchers)))

    def _live(self) -> list[str]:
        return [u for u in self.urls if u not in self.down]

    def sync_weights(self, version: int) -> None:
        self._probed = False  # the next step probes again
        super().sync_weights(version)

    def generate(self, requests):
        with self._probing:
            if not self._probed:
                self.check()
                self._probed = True
        held = dict(self.loaded)
        try:
            return super().generate(requests)
        finally:  # a server that failed a request is down for the rest of the step
            for url in self.urls:
                if held[url] is not None and self.loaded[url] is None:
                    self._drop(url, "a request failed")

    def check(self) -> None:
        """Probe every server now; update which are down."""
        with ThreadPoolExecutor(len(self.urls)) as pool:
            alive = dict(zip(self.urls, pool.map(self.probe, self.urls), strict=True))
        for url, ok in alive.items():
            restarting = url in self._restarting and not self._restarting[url].done()
            if ok and not self._holds_what_we_think(url):
                self.loaded[url] = None  # restarted unseen: its weights are not ours
            if ok and not restarting:
                if url in self.down:
                    log.warning("rollout server %s is back", url)
                self.down.discard(url)
            elif not ok:
                self._drop(url, "the probe failed")

    def probe(self, url: str) -> bool:
        """A real generation of one token: the engine and its workers answer."""
        body = {
            "prompt": [self.eos_id], "max_tokens": 1, "temperature": 0.0, "logprobs": 0,
            "return_token_ids": True,
        }  # fmt: skip
        try:
            reply = self._call(url, "/v1/completions", body, timeout=self.probe_timeout)
            parse_completion(reply, 1, 1, self.vocab_size)
        except (OSError, ValueError):  # unreachable, or an invalid reply (InvalidReply)
            return False
        return True

    def _holds_what_we_think(self, url: str) -> bool:
        """In memory, a server reports the version tag of its last push; one that restarted
        between two requests reports another (the disk path cannot tell)."""
        tag_of = getattr(self.weights, "tag_of", None)
        if tag_of is None or self.loaded[url] is None:
            return True
        try:
            held = held_tag(url, lambda *a, **k: self._call(*a, **k, timeout=self.probe_timeout))
        except (OSError, ValueError):
            return False
        return held == tag_of(self.loaded[url])

    def _drop(self, url: str, why: str) -> None:
        if url not in self.down:
            log.warning("rollout server %s is down (%s): not used until it answers again", url, why)
        self.down.add(url)
        self.loaded[url] = None  # it may come back restarted, with other weights
        launch = self.launchers.get(url)
        if launch is not None and (url not in self._restarting or self._restarting[url].done()):
            self.restarts += 1
            self._restarting[url] = self._restarter.submit(launch)

    def metrics(self) -> dict:
        return {"rollout_servers_down": len(self.down), "rollout_server_restarts": self.restarts}
