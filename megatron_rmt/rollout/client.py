"""The trainer's client of vLLM rollout servers (`--rollout-url`): a `RolloutEngine` over HTTP.

One `RolloutRequest` is one `/v1/completions` call: the prompt as token ids (nothing is
re-tokenised), n = G samples, the request's max tokens, temperature, top-p and seed, the sampled
tokens' log-probs (`logprobs: 0`) and the sampled token ids (`return_token_ids`). EOS is passed
as a stop token id, so servers that know no tokenizer stop the same way.

Deliberate choices:
- Standard library only (urllib + a thread pool): the trainer never imports vLLM and needs no
  HTTP package. At most `max_concurrency` requests are in flight; request i goes to server
  i mod N (load spread), and each retry moves to the next server after an exponential backoff.
  A response is validated (n samples, one log-prob per token) before it is used, so a server that
  returns garbage counts as failed. After `retries` retries `generate` raises `RolloutError`; the
  dispatcher then makes the step NTP-only and the trainer counts it.
- Weights: with a `DiskWeightSync`, `sync_weights` writes the trainer's weights on every rank and
  global rank 0 reloads every server (pause -> reload_weights -> resume).
  The client remembers which weight version each server holds. A server that failed a reload, or
  failed a request (it may have been restarted with its original weights), is reloaded from the
  latest files before it serves again; a server that cannot be brought up to date is not used.
  So every result carries the version that produced it.
- With a `MemoryWeightSync` (`--weight-transfer gloo|nccl`) the weights go through vLLM's
  weight-transfer API instead (weight_transfer.py); a stale server waits for the next sync.
- Without a weight sync (a frozen server, e.g. reference log-probs) results carry the version
  the trainer last announced.
"""

import itertools
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_rmt.rollout.contract import RolloutRequest, RolloutResult
from megatron_rmt.rollout.transports import TRANSPORTS, transfer_timeout
from megatron_rmt.rollout.weight_sync import DiskWeightSync
from megatron_rmt.rollout.weight_transfer import MemoryWeightSync

log = logging.getLogger(__name__)


class RolloutError(RuntimeError):
    """The rollout service could not serve a request after all retries."""


class VLLMEngine:
    collective = False

    def __init__(
        self,
        urls: list[str],
        eos_id: int,
        *,
        timeout: float = 120.0,
        retries: int = 3,
        max_concurrency: int = 16,
        api_key: str | None = None,
        backoff_s: float = 0.5,
        weights: DiskWeightSync | MemoryWeightSync | None = None,
    ):
        if not urls:
            raise ValueError("VLLMEngine needs at least one server URL")
        self.urls = [u.rstrip("/") for u in urls]
        self.eos_id = eos_id
        self.timeout = timeout
        self.retries = retries
        self.max_concurrency = max_concurrency
        self.api_key = api_key
        self.backoff_s = backoff_s
        self.weights = weights
        self.version = 0
        self.weights_path: str | None = None  # directory of the latest synced weights
        self.loaded: dict[str, int | None] = dict.fromkeys(self.urls, None)
        self._next = itertools.count()
        self._reloading = threading.Lock()

    # -- health -----------------------------------------------------------------------------

    def check_reachable(self) -> None:
        """Raise naming every server that does not answer /health (before training starts)."""
        down = []
        for url in self.urls:
            try:
                self._call(url, "/health", None, method="GET", timeout=min(self.timeout, 10.0))
            except OSError as e:
                down.append(f"{url} ({e})")
        if down:
            raise RolloutError("rollout servers unreachable: " + ", ".join(down))

    # -- weights ----------------------------------------------------------------------------

    def sync_weights(self, version: int) -> None:
        """Every rank: write the weights (when due) and have rank 0 reload every server. Rank 0
        pauses the servers while the weights are written: vLLM's pause ends with a fixed 20 ms
        sleep, which the write hides."""
        if self.weights is None:
            self.version = version
            return
        if not self.weights.due(version):
            return
        if getattr(self.weights, "in_memory", False):  # weight_transfer.MemoryWeightSync
            pushed = self.weights.push(version, self._live(), self._call)
            self.loaded = dict.fromkeys(self.urls) | pushed
            self.version = version
            return
        with ThreadPoolExecutor(1) as pool:
            pausing = pool.submit(self._pause_all) if self.weights.is_reloader else None
            try:
                path = self.weights.write(version)
            except BaseException:
                for url, error in (pausing.result() if pausing else {}).items():
                    self._load_and_resume(url, None, version, error)  # resume only
                raise
        paused = pausing.result() if pausing else {}
        self.loaded = self.weights.reload_from_rank0(
            lambda: (
                dict.fromkeys(self.urls)
                | {url: self._load_and_resume(url, path, version, e) for url, e in paused.items()}
            )
        )
        self.weights_path, self.version = path, version

    def reload_server(self, url: str, path: str, version: int) -> int | None:
        """Load `path` into one server; the version it now holds, or None if that failed."""
        return self._load_and_resume(url, path, version, self._pause(url))

    def _pause_all(self) -> dict[str, OSError | None]:
        return {url: self._pause(url) for url in self._live()}

    def _pause(self, url: str) -> OSError | None:
        """Drain the server's requests (new ones queue until resume), then clear its KV and
        prefix caches (vLLM's default `clear_cache=true`), so no block computed with the old
        weights outlives the pause. The error, if it failed."""
        try:
            self._call(url, "/pause?mode=wait", {})
        except OSError as e:
            return e
        return None

    def _load_and_resume(
        self, url: str, path: str | None, version: int, error: OSError | None
    ) -> int | None:
        """After `_pause` gave `error`: load `path` if the pause worked (None: load nothing),
        then resume in any case. The version the server now holds, or None."""
        if error is None and path is not None:
            try:
                self._call(url, "/collective_rpc", {
                    "method": "reload_weights", "kwargs": {"weights_path": path}})  # fmt: skip
            except OSError as e:
                error = e
        try:
            self._call(url, "/resume", {})  # never leave a server paused
        except OSError as e:
            error = error or e
        if error is not None:
            log.warning("weight reload of %s failed, it is not used until reloaded: %s", url, error)
        return None if error is not None or path is None else version

    def _current_servers(self) -> list[str]:
        """The servers holding the current weights, after retrying the reload of stale ones."""
        if self.weights is None:
            return self._live()
        with self._reloading:  # generate may run in several threads: one reload per stale server
            for url in self._live():
                if self.loaded[url] != self.version and self.weights_path is not None:
                    self.loaded[url] = self.reload_server(url, self.weights_path, self.version)
        return [u for u in self._live() if self.loaded[u] == self.version]

    def _live(self) -> list[str]:
        """The servers to use and sync now (fleet.FleetEngine leaves out those found down)."""
        return self.urls

    # -- sampling ---------------------------------------------------------------------------

    def generate(self, requests: list[RolloutRequest]) -> list[RolloutResult]:
        servers = self._current_servers()
        if not servers:
            raise RolloutError(f"no rollout server holds weights v{self.version}")
        workers = max(1, min(self.max_concurrency, len(requests)))
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(lambda r: self._complete(r, servers), requests))

    def _complete(self, req: RolloutRequest, servers: list[str]) -> RolloutResult:
        start = next(self._next)
        body = completion_body(req, self.eos_id)
        error = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            url = servers[(start + attempt) % len(servers)]
            try:
                responses, logprobs = parse_completion(
                    self._call(url, "/v1/completions", body), req.n
                )
                return RolloutResult(responses, logprobs, self.version)
            except (OSError, ValueError, KeyError, TypeError) as e:
                error = e
                if self.weights is not None and isinstance(e, OSError):
                    self.loaded[url] = None  # it may come back restarted, with other weights
                log.warning("rollout attempt %d on %s failed: %s", attempt + 1, url, e)
        raise RolloutError(f"rollout failed after {self.retries + 1} attempts: {error}")

    def _call(self, url: str, path: str, body: dict | None, method: str = "POST", timeout=None):
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(url + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:  # keep the server's explanation
            raise OSError(f"HTTP {e.code} from {url}{path}: {e.read()[:500]!r}") from e
        return json.loads(raw) if raw.strip() else None


def completion_body(req: RolloutRequest, eos_id: int) -> dict:
    return {
        "prompt": list(req.prompt_ids),
        "n": req.n,
        "max_tokens": req.max_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "seed": req.seed,
        "logprobs": 0,  # the sampled token's log-prob only
        "return_token_ids": True,
        "stop_token_ids": [eos_id],
        "skip_special_tokens": False,
    }


def parse_completion(reply: dict, n: int) -> tuple[list[list[int]], list[list[float]]]:
    """(token ids, log-probs) of the n choices in index order; ValueError on a malformed reply."""
    choices = sorted(reply["choices"], key=lambda c: c["index"])
    if len(choices) != n:
        raise ValueError(f"asked for {n} samples, got {len(choices)}")
    responses, logprobs = [], []
    for c in choices:
        ids, lps = c["token_ids"], c["logprobs"]["token_logprobs"]
        if not ids or len(ids) != len(lps) or not all(isinstance(x, int) for x in ids):
            raise ValueError(
                f"malformed choice: {len(ids or [])} tokens, {len(lps or [])} log-probs"
            )
        responses.append(list(ids))
        logprobs.append([float(x) for x in lps])
    return responses, logprobs


def build_engine(cfg, trainable, tokenizer, vocab_size: int):
    """The engine `train.setup` uses when `--rollout-url` is set. `vocab_size` is the served
    model's vocabulary (its config.json `vocab_size`): Megatron's padding rows are cut to it.
    The API key, if the servers want one, comes from $MEGATRON_RMT_VLLM_API_KEY (not the config,
    which is logged and checkpointed). Raises before training if a server is unreachable."""
    r = cfg.rollout
    if r.weight_transfer == "disk":
        weights = DiskWeightSync(
            trainable.model, cfg.model, vocab_size, r.weight_sync_dir, r.weight_sync_interval
        )
    else:
        timeout = transfer_timeout(r.rollout_timeout)
        transport = TRANSPORTS[r.weight_transfer](timeout, r.weight_transfer_address)
        weights = MemoryWeightSync(
            trainable.model, cfg.model, vocab_size, transport, r.weight_sync_interval
        )
    from megatron_rmt.rollout.fleet import FleetEngine  # a subclass of VLLMEngine

    engine = FleetEngine(
        r.rollout_url,
        tokenizer.eod,
        timeout=r.rollout_timeout,
        retries=r.rollout_retries,
        max_concurrency=r.rollout_max_concurrency,
        api_key=os.environ.get("MEGATRON_RMT_VLLM_API_KEY"),
        weights=weights,
    )
    if dist.get_rank(ps.get_model_parallel_group()) == 0:  # the ranks that will call it
        engine.check_reachable()
    return engine
