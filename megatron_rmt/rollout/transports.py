"""How the weight buckets travel from the trainer's rank 0 to one vLLM server's workers: the
trainer side of vLLM's weight-transfer backends.

- `GlooTransport` pairs with this project's `gloo` backend (`megatron_rmt_vllm`, a vLLM plugin):
  any host, CPU or GPU server, over TCP. The trainer hosts the TCP store.
- `ShmTransport` pairs with the same backend for a server on the trainer's own host: the buckets
  go through a file in /dev/shm that both sides map, so neither side copies them through a
  socket; the next bucket is copied in while the server loads the last one. It holds one copy
  of the model's weights in shared memory per server (wire.py says why no less).
- `NcclTransport` pairs with vLLM's built-in `nccl` backend (GPU servers): vLLM's own trainer
  endpoint and packed broadcast (double-buffered 1 GiB chunks by default), so the trainer needs
  vLLM importable on GPU hosts. Untested here (no GPU): it follows vLLM 0.32's
  `NCCLTrainerWeightTransferEngine` call for call.

`timeout_s` bounds the rendezvous, each broadcast and the server calls that span them
(init, update); the client makes it at least 30 s (`transfer_timeout`): opening a group or
loading a bucket on a loaded host can take longer than one rollout request.

One group per server (world size 1 + that server's workers): a server that dies or restarts is
reconnected alone, the others keep theirs. `connect` runs the server's
`/init_weight_transfer_engine` while the trainer joins, as both sides rendezvous together; `send`
runs `/update_weights` (the workers receive) while the trainer broadcasts one bucket. A server
call that fails ends the operation at once (a server without the backend answers HTTP 500): the
trainer's side, which that server will never join, is abandoned to its own timeout, and the
server is reconnected with a fresh group next time.
"""

import datetime
import ipaddress
import os
import socket
import tempfile
import threading
import urllib.parse
import uuid
import weakref
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist

from megatron_rmt_vllm import wire


def local_address_towards(url: str) -> str:
    """This host's address on the route to the server (no packet is sent)."""
    host = urllib.parse.urlsplit(url).hostname
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, 9))
        return s.getsockname()[0]


def _while(server_call, transfer):
    """Run the trainer's side of a `transfer` (in a daemon thread) while the `server_call` runs
    here; both must succeed. A server call that fails raises at once: the transfer, which that
    server will never join, is left to end by its own timeout instead of being waited for (a
    server started without the backend answers HTTP 500 within milliseconds)."""
    outcome, done = {}, threading.Event()

    def run():
        try:
            outcome["result"] = transfer()
        except BaseException as e:  # re-raised below once the server call has succeeded
            outcome["error"] = e
        finally:
            done.set()

    threading.Thread(target=run, name="weight-transfer", daemon=True).start()
    server_call()
    done.wait()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _init_on_server(url: str, call, info: dict, backend: str, wait: dict) -> None:
    try:
        call(url, "/init_weight_transfer_engine", {"init_info": info}, **wait)
    except OSError as e:
        raise OSError(
            f"{url} did not open a {backend} weight transfer (is it serving with "
            f"`--weight-transfer {backend}`, see megatron_rmt.rollout.serve?): {e}"
        ) from e


def on_this_host(url: str) -> bool:
    """Whether the server's address is one of this host's (loopback, or the address this host
    reaches it from)."""
    host = urllib.parse.urlsplit(url).hostname
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror:
        return False
    if any(ipaddress.ip_address(a).is_loopback for a in addresses):
        return True
    return local_address_towards(url) in addresses


class _Transport:
    """What the transports share unless they say otherwise: a bucket goes as its description
    (wire.py) and its tensors, and a sync's buckets are sent one at a time."""

    def pack(self, names: list[str], tensors: list[torch.Tensor]):
        return wire.describe(names, tensors), tensors

    def send_all(self, url: str, buckets: list, call) -> None:
        for info, payload in buckets:
            self.send(url, info, payload, call)


class GlooTransport(_Transport):
    backend = "gloo"

    def __init__(self, timeout_s: float, address: str | None = None):
        self.timeout_s = timeout_s
        self.wait = {"timeout": timeout_s}  # for the server calls that span a transfer
        self.address = address
        self.groups: dict[str, dist.ProcessGroupGloo] = {}

    def connect(self, url: str, call, workers: int) -> None:
        address = self.address or local_address_towards(url)
        store = dist.TCPStore(
            address, 0, 1 + workers, is_master=True, wait_for_workers=False,
            timeout=datetime.timedelta(seconds=self.timeout_s),
        )  # fmt: skip
        info = {
            "master_address": address, "master_port": store.port, "world_size": 1 + workers,
            "rank_offset": 1, "timeout_s": self.timeout_s,
        }  # fmt: skip
        self.groups[url] = _while(
            lambda: _init_on_server(url, call, info, self.backend, self.wait),
            lambda: wire.open_group(store, 0, 1 + workers, self.timeout_s),
        )

    def send(self, url: str, info: dict, tensors: list[torch.Tensor], call) -> None:
        group = self.groups[url]
        _while(
            lambda: call(url, "/update_weights", {"update_info": info}, **self.wait),
            lambda: wire.send(group, tensors),
        )

    def drop(self, url: str) -> None:
        self.groups.pop(url, None)


class ShmTransport(_Transport):
    backend = "gloo"  # the server's side: the same plugin, no group needed

    def __init__(
        self, timeout_s: float, address: str | None = None, chunk_bytes: int = 64 << 20,
        directory: str = "/dev/shm",
    ):  # fmt: skip
        del address  # the server is on this host
        self.wait = {"timeout": timeout_s}
        self.chunk_bytes = chunk_bytes  # one /update_weights call: the unit of the overlap
        self.directory = directory if os.path.isdir(directory) else tempfile.gettempdir()
        self.regions: dict[str, _SharedFile] = {}  # url -> its file, while the server maps it

    def connect(self, url: str, call, workers: int) -> None:
        """A new or restarted server: it maps a new file at its first update."""
        if not on_this_host(url):
            raise ValueError(
                f"{url} is not on this host: the shm weight transfer needs the server beside "
                "the trainer (use --weight-transfer gloo for a server elsewhere)"
            )
        self.drop(url)

    def send_all(self, url: str, buckets: list, call) -> None:
        """Every tensor of the sync gets its own place in the server's file. The sync's buckets
        are cut into chunks of about `chunk_bytes`, one `/update_weights` call each, and chunk
        k + 1 is copied in while the server loads chunk k (measured: 64 MiB beats one call for
        the whole model, docs/rollout.md)."""
        pairs = [
            pair for info, tensors in buckets for pair in zip(info["names"], tensors, strict=True)
        ]
        placed, end = [], 0
        for names, tensors in wire.buckets(pairs, self.chunk_bytes):
            offsets, end = wire.layout(tensors, end)
            placed.append((wire.describe(names, tensors), tensors, offsets))
        shared = self._file(url, end)
        where = {"shm_path": shared.path, "shm_bytes": shared.nbytes}
        with ThreadPoolExecutor(1, thread_name_prefix="weight-update") as pool:
            loading = None
            for info, tensors, offsets in placed:
                for tensor, offset in zip(tensors, offsets, strict=True):
                    wire.place(shared.region, offset, tensor.dtype, tensor.shape).copy_(tensor)
                if loading is not None:
                    self._loaded(url, loading)
                body = {"update_info": dict(info, offsets=offsets, **where)}
                loading = pool.submit(call, url, "/update_weights", body, **self.wait)
            if loading is not None:
                self._loaded(url, loading)
        shared.unlink()  # mapped by every worker now; gone from /dev/shm once they let go

    @staticmethod
    def _loaded(url: str, loading) -> None:
        try:
            loading.result()
        except OSError as e:
            raise OSError(
                f"{url} did not load a shared-memory weight update (is it serving with "
                f"`--weight-transfer gloo` on this host?): {e}"
            ) from e

    def _file(self, url: str, nbytes: int) -> "_SharedFile":
        shared = self.regions.get(url)
        if shared is None or shared.nbytes < nbytes:
            shared = self.regions[url] = _SharedFile(self.directory, nbytes)
        return shared

    def drop(self, url: str) -> None:
        shared = self.regions.pop(url, None)
        if shared is not None:
            shared.unlink()


class _SharedFile:
    """One server's file in shared memory, mapped here; unlinked at the latest when this object
    or the process goes."""

    def __init__(self, directory: str, nbytes: int):
        name = f"megatron-rmt-weights-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.path, self.nbytes = os.path.join(directory, name), nbytes
        self.region = wire.shared_file(self.path, nbytes, create=True)
        self.unlink = weakref.finalize(self, _remove, self.path)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class NcclTransport(_Transport):
    backend = "nccl"

    def __init__(self, timeout_s: float, address: str | None = None, bucket_bytes: int = 1 << 30):
        self.timeout_s = timeout_s
        self.wait = {"timeout": timeout_s}
        self.address = address
        self.bucket_bytes = bucket_bytes
        self.groups: dict = {}

    def connect(self, url: str, call, workers: int) -> None:
        from vllm.distributed.weight_transfer.nccl_common import trainer_init

        address = self.address or local_address_towards(url)
        with socket.socket() as s:
            s.bind((address, 0))
            port = s.getsockname()[1]
        info = {
            "master_address": address, "master_port": port, "world_size": 1 + workers,
            "rank_offset": 1, "packed": True, "packed_buffer_size_bytes": self.bucket_bytes,
            "packed_num_buffers": 2,
        }  # fmt: skip
        self.groups[url] = _while(
            lambda: _init_on_server(url, call, info, self.backend, self.wait),
            lambda: trainer_init(info),
        )

    def pack(self, names: list[str], tensors: list[torch.Tensor]):
        return wire.describe(names, tensors), list(zip(names, tensors, strict=True))

    def send(self, url: str, info: dict, pairs: list, call) -> None:
        from vllm.distributed.weight_transfer.packed_tensor import packed_nccl_broadcast_producer

        group = self.groups[url]

        def broadcast():
            packed_nccl_broadcast_producer(
                iterator=iter(pairs), group=group, src=0, post_iter_func=lambda item: item[1],
                buffer_size_bytes=self.bucket_bytes, num_buffers=2,
            )  # fmt: skip
            torch.cuda.current_stream().synchronize()

        _while(lambda: call(url, "/update_weights", {"update_info": info}, **self.wait), broadcast)

    def drop(self, url: str) -> None:
        group = self.groups.pop(url, None)
        if group is not None:
            group.destroy()


TRANSPORTS = {"gloo": GlooTransport, "shm": ShmTransport, "nccl": NcclTransport}


def transfer_timeout(rollout_timeout: float) -> float:
    return max(rollout_timeout, 30.0)
