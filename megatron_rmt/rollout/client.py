"""The trainer's client of vLLM rollout servers (`--rollout-url`): a `RolloutEngine` over HTTP.

One `RolloutRequest` is one `/v1/completions` call: the prompt as token ids (nothing is
re-tokenised), n = G samples, the request's max tokens, temperature, top-p and seed, the sampled
tokens' log-probs (`logprobs: 0`) and the sampled token ids (`return_token_ids`). EOS is passed
as a stop token id, so servers that know no tokenizer stop the same way.

Deliberate choices:
- Standard library only (urllib + a thread pool): the trainer never imports vLLM and needs no
  HTTP package. At most `max_concurrency` requests are in flight; request i goes to server
  i mod N (load spread), and each retry moves to the next server after an exponential backoff.
- No reply is trusted (`parse_completion`): it must be JSON with exactly n choices indexed
  0..n-1, each of 1..max_tokens token ids within the served vocabulary and as many finite
  log-probs <= 0. Anything else is an invalid reply: the attempt fails like a connection error
  (and is counted in `invalid_replies`), so NaN, positive log-probs or foreign ids never reach the
  loss. After `retries` retries `generate` raises `RolloutError`; the dispatcher then trains the
  step without that request (NTP-only if none is left) and the trainer counts it.
- A control route (`/health`, `/pause`, `/collective_rpc`, `/resume`) answering an HTTP error,
  garbage or no valid HTTP at all is a failure of that server, never of the run.
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

import http.client
import itertools
import json
import logging
import math
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from megatron_rmt.rollout.contract import RolloutRequest, RolloutResult
from megatron_rmt.rollout.weight_sync import DiskWeightSync
from megatron_rmt.rollout.weight_transfer import MemoryWeightSync

log = logging.getLogger(__name__)


class RolloutError(RuntimeError):
    """The rollout service could not serve a request after all retries."""


class InvalidReply(ValueError):
    """A reply that must not be trained on: malformed, or values no sampler produces."""


LOGPROB_SLACK = 1e-4  # a sampled token's log-prob may round a little above 0, never more

# What `_call` fails with: OSError (transport, timeout, HTTP error status, broken HTTP) or
# InvalidReply (a body that is not JSON).
SERVER_ERRORS = (OSError, InvalidReply)


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
        vocab_size: int | None = None,
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
        self.vocab_size = vocab_size  # the served vocabulary; None: ids are only checked >= 0
        self.invalid_replies = 0  # rejected /v1/completions replies, ever (see parse_completion)
        self._counting = threading.Lock()
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
            except SERVER_ERRORS as e:
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

    def _pause_all(self) -> dict[str, Exception | None]:
        return {url: self._pause(url) for url in self._live()}

    def _pause(self, url: str) -> Exception | None:
        """Drain the server's requests (new ones queue until resume), then clear its KV and
        prefix caches (vLLM's default `clear_cache=true`), so no block computed with the old
        weights outlives the pause. The error, if it failed."""
        try:
            self._call(url, "/pause?mode=wait", {})
        except SERVER_ERRORS as e:
            return e
        return None

    def _load_and_resume(
        self, url: str, path: str | None, version: int, error: Exception | None
    ) -> int | None:
        """After `_pause` gave `error`: load `path` if the pause worked (None: load nothing),
        then resume in any case. The version the server now holds, or None."""
        if error is None and path is not None:
            try:
                self._call(url, "/collective_rpc", {
                    "method": "reload_weights", "kwargs": {"weights_path": path}})  # fmt: skip
            except SERVER_ERRORS as e:
                error = e
        try:
            self._call(url, "/resume", {})  # never leave a server paused
        except SERVER_ERRORS as e:
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
            # The version when the request went out: a weight sync while it is in flight lets it
            # finish at these weights (the pause drains), or it waits and runs at the new ones.
            # Either way it was sampled no older than this, so the trainer's staleness check on
            # it errs on the safe side (one-step-ahead rollouts are in flight across a sync).
            sent = self.version
            try:
                reply = self._call(url, "/v1/completions", body)
                responses, logprobs = parse_completion(
                    reply, req.n, req.max_tokens, self.vocab_size
                )
                return RolloutResult(responses, logprobs, sent)
            except OSError as e:
                error = e
                if self.weights is not None:
                    self.loaded[url] = None  # it may come back restarted, with other weights
            except InvalidReply as e:
                error = e
                with self._counting:
                    self.invalid_replies += 1
            log.warning("rollout attempt %d on %s failed: %s", attempt + 1, url, error)
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
        except http.client.HTTPException as e:  # not HTTP at all, or cut short
            raise OSError(f"broken HTTP reply from {url}{path}: {e!r}") from e
        try:
            return json.loads(raw) if raw.strip() else None
        except ValueError as e:
            raise InvalidReply(f"reply of {url}{path} is not JSON: {raw[:200]!r}") from e


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


def parse_completion(
    reply, n: int, max_tokens: int, vocab_size: int | None
) -> tuple[list[list[int]], list[list[float]]]:
    """(token ids, log-probs) of the n choices in index order. InvalidReply unless the reply has
    exactly n choices indexed 0..n-1, each with 1..max_tokens ids in [0, vocab_size) (vocab_size
    None: no upper bound) and as many finite log-probs <= 0 (up to LOGPROB_SLACK)."""
    choices = reply.get("choices") if isinstance(reply, dict) else None
    if not isinstance(choices, list) or len(choices) != n:
        got = len(choices) if isinstance(choices, list) else "no list of choices"
        raise InvalidReply(f"asked for {n} samples, got {got}")
    by_index = dict(_parse_choice(c, max_tokens, vocab_size) for c in choices)
    if sorted(by_index) != list(range(n)):
        raise InvalidReply(f"choice indices {sorted(by_index)} are not 0..{n - 1}")
    ordered = [by_index[i] for i in range(n)]
    return [ids for ids, _ in ordered], [lps for _, lps in ordered]


def _parse_choice(c, max_tokens: int, vocab_size: int | None):
    """(index, (ids, log-probs)) of one choice; InvalidReply if it cannot be trained on."""
    try:
        index, ids, lps = c["index"], c["token_ids"], c["logprobs"]["token_logprobs"]
    except (KeyError, TypeError, IndexError) as e:
        raise InvalidReply(f"malformed choice: {e!r}") from e
    if type(index) is not int or not isinstance(ids, list) or not isinstance(lps, list):
        raise InvalidReply("malformed choice: index, token_ids or token_logprobs of wrong type")
    if not 1 <= len(ids) <= max_tokens or len(lps) != len(ids):
        raise InvalidReply(
            f"malformed choice: {len(ids)} tokens (1..{max_tokens} allowed), {len(lps)} log-probs"
        )
    top = math.inf if vocab_size is None else vocab_size
    bad_ids = [t for t in ids if type(t) is not int or not 0 <= t < top]
    if bad_ids:
        raise InvalidReply(f"token id outside [0, {top}): {bad_ids[0]!r}")
    bad_lps = [x for x in lps if type(x) not in (int, float) or not -math.inf < x <= LOGPROB_SLACK]
    if bad_lps:  # NaN fails every comparison
        raise InvalidReply(f"log-prob not finite and <= 0: {bad_lps[0]!r}")
    return index, (list(ids), [float(x) for x in lps])
